"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps each parameter of the modules it manages as a DTensor sharded over the ranks
(``Shard(0)`` by default; each rank holds a slice of rows), gathers the whole parameter onto
the module just before the forward of the module ``fully_shard`` was applied to, and puts
the sharded one back after it (and again around the backward, reduce-scattering the gradient
into the sharded parameter's ``.grad``). Compression works with that cycle rather than
against it: quantization-aware training fake-quantizes the whole weight FSDP2 gathered, at
forward time (``modifiers.quantization.fully_sharded``); masks and scores hold on the
sharded parameter, as on a tensor-parallel one (``utils.sharding``). What that needs of FSDP2
is here: which modules it manages, the layouts supported, and turning the model back into an
ordinary one in place once training ends (``release_fully_sharded``, called by
``sharding.gather_sharded_model``, which then gathers the sharded parameters).

Only one-dimensional meshes are supported (plain FSDP): HSDP and FSDP combined with tensor
parallelism (two-dimensional meshes) are refused by ``check_fully_sharded``.
"""

from __future__ import annotations

from typing import Any

import torch
from loguru import logger
from torch.distributed.tensor import DTensor

__all__ = [
    "check_fully_sharded",
    "fully_sharded_modules",
    "is_fully_sharded_module",
    "is_torch_distributed_hook",
    "release_fully_sharded",
    "remove_hooks_from",
]

# the attribute fully_shard sets on every module whose parameters it manages
_MANAGED = "_is_fsdp_managed_module"
_FSDP_HOOKS = "torch.distributed.fsdp"


def fully_sharded_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules ``fully_shard`` was applied to (``FSDPModule``), by name."""
    from torch.distributed.fsdp import FSDPModule

    def given_to_fully_shard(module: torch.nn.Module) -> bool:
        return isinstance(module, FSDPModule)

    return [(name, m) for name, m in model.named_modules() if given_to_fully_shard(m)]


def is_fully_sharded_module(module: torch.nn.Module) -> bool:
    """Whether FSDP2 manages ``module``'s own parameters (it or an ancestor was given to
    ``fully_shard``): its weight is then FSDP2's sharded DTensor outside the forward and the
    whole weight during it."""
    return bool(getattr(module, _MANAGED, False))


def check_fully_sharded(model: torch.nn.Module) -> None:
    """Refuse an FSDP2 layout compression does not support: a mesh of more than one
    dimension (HSDP, or FSDP combined with tensor parallelism).

    :raises ValueError: naming the module and its mesh
    """
    for name, module in fully_sharded_modules(model):
        for param in module.parameters():
            if isinstance(param, DTensor) and param.device_mesh.ndim != 1:
                raise ValueError(
                    f"{name or 'the model'} is sharded with FSDP2 (fully_shard) on a "
                    f"{param.device_mesh.ndim}-dimensional device mesh "
                    f"{tuple(param.device_mesh.mesh.shape)} (HSDP, or FSDP with tensor "
                    "parallelism), which compression-aware training does not support; shard "
                    "over a one-dimensional mesh (plain FSDP), or use tensor parallelism alone"
                )


def is_torch_distributed_hook(hook: Any, prefixes: tuple[str, ...]) -> bool:
    """Whether a module hook was defined in one of torch's distributed packages (``prefixes``
    of its ``__module__``): the hooks ``parallelize_module`` and ``fully_shard`` add."""
    hook = getattr(hook, "hook", hook)  # state-dict hooks arrive wrapped (_WrappedHook)
    return str(getattr(hook, "__module__", "")).startswith(prefixes)


_HOOK_TABLES = (
    ("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
    ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
    ("_state_dict_pre_hooks", ()),
    ("_state_dict_hooks", ()),
    ("_load_state_dict_pre_hooks", ()),
    ("_load_state_dict_post_hooks", ()),
)


def remove_hooks_from(module: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    """Remove ``module``'s forward and state-dict hooks defined under ``prefixes``
    (``is_torch_distributed_hook``), with their flags; how many were removed."""
    removed = 0
    for table, flags in _HOOK_TABLES:
        hooks = getattr(module, table, {})
        for key in [k for k, h in hooks.items() if is_torch_distributed_hook(h, prefixes)]:
            del hooks[key]
            for flag in flags:
                getattr(module, flag, {}).pop(key, None)
            removed += 1
    return removed


@torch.no_grad()
def release_fully_sharded(model: torch.nn.Module) -> int:
    """Take ``model`` out of FSDP2's management in place, on every rank: every module
    ``fully_shard`` was applied to is resharded (its sharded parameters registered again,
    should a forward have left the whole ones there), then loses FSDP2's forward and
    state-dict hooks, its state and its ``FSDP<Class>`` class (the original class again, so
    ``save_pretrained`` names the architecture as before). The parameters stay FSDP2's
    sharded DTensors; ``sharding.gather_sharded_model`` gathers them into whole tensors.
    Call it after the last training step (the optimizer's references go stale).

    :return: how many modules were released
    """
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule

    sharded = fully_sharded_modules(model)
    for _, module in sharded:
        module.reshard()  # type: ignore[operator]
    for _, module in sharded:
        cls = type(module)
        module.__class__ = cls.__mro__[cls._orig_cls_mro_index]  # type: ignore[attr-defined]
        assert not isinstance(module, FSDPModule)
        _module_state_mapping.pop(module, None)
        for key in (STATE_KEY, REGISTRY_KEY):
            table = module.__dict__.get(key)
            if table is not None:
                for entry in [k for k in table if getattr(k, "__name__", k) == "fully_shard"]:
                    del table[entry]
                if not table:
                    del module.__dict__[key]
    for module in model.modules():
        remove_hooks_from(module, (_FSDP_HOOKS,))
        for flag in (_MANAGED, "_fsdp_use_orig_params"):
            module.__dict__.pop(flag, None)
    if sharded:
        logger.info("released {} module(s) from FSDP2 (fully_shard)", len(sharded))
    return len(sharded)

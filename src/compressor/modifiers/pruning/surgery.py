"""Model surgery: pure functions that physically remove pruned units and keep the config in
step, so the smaller model computes what the masked one did and reloads with
``from_pretrained``."""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from loguru import logger

from compressor.architectures import BATCH_NORMS
from compressor.modifiers.pruning.coupling import Coupling, member_tensors

__all__ = [
    "check_config",
    "pruned_units",
    "shrink_coupling",
    "shrink_couplings",
    "shrink_module",
    "unit_index",
]


def unit_index(keep: torch.Tensor, size: int) -> torch.Tensor:
    """Indices along a dimension of ``size`` that the kept units (a bool per unit) cover."""
    n_units = keep.numel()
    if size % n_units:
        raise ValueError(f"{n_units} units do not divide a dimension of size {size}")
    width = size // n_units
    units = keep.nonzero().flatten()
    return (units[:, None] * width + torch.arange(width)).flatten()


def _sliced(param: torch.Tensor, index: torch.Tensor, dim: int) -> torch.nn.Parameter:
    value = param.detach().index_select(dim, index.to(param.device)).clone()
    return torch.nn.Parameter(value, requires_grad=param.requires_grad)


def shrink_module(module: torch.nn.Module, index: torch.Tensor, dim: int) -> None:
    """Keep only ``index`` along ``dim`` (0: outputs, with the bias; 1: inputs) of a Linear,
    Conv2d or BatchNorm, updating its size attributes."""
    if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
        module.weight = _sliced(module.weight, index, dim)
        if dim == 0 and module.bias is not None:
            module.bias = _sliced(module.bias, index, 0)
        size = module.weight.shape[dim]
        if isinstance(module, torch.nn.Linear):
            setattr(module, "out_features" if dim == 0 else "in_features", size)
        else:
            setattr(module, "out_channels" if dim == 0 else "in_channels", size)
    elif isinstance(module, BATCH_NORMS):
        if dim != 0:
            raise ValueError("a BatchNorm only has output features")
        if module.affine:
            module.weight = _sliced(module.weight, index, 0)
            module.bias = _sliced(module.bias, index, 0)
        if module.track_running_stats:
            module.running_mean = module.running_mean.index_select(0, index)
            module.running_var = module.running_var.index_select(0, index)
        module.num_features = index.numel()
    else:
        raise TypeError(f"cannot remove units from a {type(module).__name__}")


def shrink_coupling(coupling: Coupling, keep: torch.Tensor) -> None:
    """Remove the units of ``coupling`` where ``keep`` is False from every member."""
    for member in coupling.members:
        assert member.dim is not None, "only structured couplings can shrink"
        size = member.module.weight.shape[member.dim]
        shrink_module(member.module, unit_index(keep.cpu(), size), member.dim)


def pruned_units(coupling: Coupling) -> torch.Tensor:
    """A bool per unit: True where every tensor of every member is exactly zero."""
    assert coupling.n_units is not None
    zero = torch.ones(coupling.n_units, dtype=torch.bool)
    for member in coupling.members:
        for _, param in member_tensors(member):
            dim = member.dim if param.dim() > 1 else 0
            assert dim is not None
            per_unit = param.detach().movedim(dim, 0).reshape(coupling.n_units, -1)
            zero &= (per_unit == 0).all(dim=1).cpu()
    return zero


def _set_attribute(block: torch.nn.Module, path: str, value: int) -> None:
    module_path, _, attribute = path.rpartition(".")
    target = block.get_submodule(module_path) if module_path else block
    if not hasattr(target, attribute):
        raise AttributeError(f"{type(target).__name__} has no attribute {attribute!r}")
    setattr(target, attribute, value)


def check_config(config: Any, values: dict[str, int], owner: str = "the model") -> None:
    """Raise, before any surgery, when ``config`` cannot take ``values``."""
    if not values:
        return
    if config is None:
        raise ValueError(f"{owner} has no config to record {values} in")
    trial = copy.deepcopy(config)
    try:
        for key, value in values.items():
            setattr(trial, key, value)
        validate = getattr(trial, "validate", None)
        if callable(validate):
            validate()
    except Exception as err:
        raise ValueError(
            f"the pruned model needs config {values}, which {type(config).__name__} rejects "
            f"({err}); choose a density that keeps a count the config accepts"
        ) from None


def shrink_couplings(
    model: torch.nn.Module, couplings: list[Coupling], keep: list[torch.Tensor]
) -> dict[str, int]:
    """Shrink every coupling and update the model config and the modules' head counts.

    Couplings that set the same config key must keep the same number of units (the config
    describes every layer with one number).

    :param keep: per coupling, a bool per unit (True: kept)
    :return: the config values that were set
    """
    kept_by_key: dict[str, set[int]] = defaultdict(set)
    for coupling, mask in zip(couplings, keep, strict=True):
        for key, scale in coupling.config.items():
            kept_by_key[key].add(int(mask.sum()) * scale)
    uneven = {k: sorted(v) for k, v in kept_by_key.items() if len(v) > 1}
    if uneven:
        raise ValueError(
            f"layers keep different numbers of units {uneven}; the config can describe only "
            "uniform pruning"
        )
    values = {key: next(iter(v)) for key, v in kept_by_key.items()}
    config: Any = getattr(model, "config", None)
    check_config(config, values, type(model).__name__)
    removed = 0
    for coupling, mask in zip(couplings, keep, strict=True):
        before = sum(p.numel() for m in coupling.members for p in m.module.parameters())
        shrink_coupling(coupling, mask)
        removed += before - sum(p.numel() for m in coupling.members for p in m.module.parameters())
        if coupling.block is not None:
            for path, scale in coupling.attributes.items():
                _set_attribute(coupling.block, path, int(mask.sum()) * scale)
    for key, value in values.items():
        setattr(config, key, value)
    logger.info("removed {} parameters; config now {}", removed, values or "unchanged")
    return values

"""SpinQuant's R3: a Hadamard per head on the queries and the keys after the rotary embedding.

``q . k`` is unchanged when both are multiplied by the same orthogonal ``H`` (``q H . k H =
q . k``), so the model computes the same function; a quantized key/value cache then stores
rotated keys, whose outliers are spread over the head. Nothing else quantizes the queries or
keys here, so without a ``kv_cache_scheme`` R3 changes nothing and only costs time.

The rotation is recorded as compressed-tensors' ``TransformScheme`` (locations ``q_attn`` and
``k_cache`` on the attention modules, matrices from its factory, named ``R3_q_attn`` and
``R3_k_cache`` as compressed-tensors names them), so a checkpoint carries it as
compressed-tensors and vLLM expect. It is hooked here rather than by compressed-tensors 0.20,
whose key hook looks for an attention argument named ``past_key_values`` that transformers
5.24 renamed ``cache``: there, its query rotation would run without its key rotation.

- keys: a forward pre-hook on each attention module hands its forward a stand-in for the
  cache (``cache`` / ``past_key_values``) whose ``update`` rotates the keys first, then passes
  them on to the real cache, or to the quantized cache's quantizer when a ``kv_cache_scheme``
  is attached (its hook runs first, so the quantizer receives and observes rotated keys);
- queries: the model's attention implementation is wrapped (``r3+<implementation>``, registered
  with transformers' ``AttentionInterface``), rotating the queries before the attention.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from compressed_tensors.transform import (
    TransformArgs,
    TransformConfig,
    TransformFactory,
    TransformScheme,
)
from compressed_tensors.utils import match_named_modules
from loguru import logger
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from compressor.modifiers.transform.spinquant.online import (
    apply_input_rotations,
    check_online_scheme,
    online_hadamard_type,
    record_transform_config,
)

__all__ = ["R3_LOCATIONS", "apply_online_rotations", "attach_r3", "is_r3_scheme", "r3_scheme"]

R3_LOCATIONS = ("q_attn", "k_cache")
_PREFIX = "r3+"
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")  # newest first


def r3_scheme(
    attention_classes: list[str],
    transform_type: str,
    head_dim: int,
    *,
    randomize: bool,
    precision: torch.dtype,
) -> TransformScheme:
    """R3 as compressed-tensors records it: one Hadamard of order ``head_dim`` on the queries
    (``q_attn``) and on the keys (``k_cache``) of every attention module.

    :param attention_classes: the attention modules' class names (compressed-tensors targets)
    :param transform_type: ``hadamard`` or ``random-hadamard``
    :param head_dim: the head size, the matrix's order
    :raises ValueError: for an order with no Hadamard construction
    """
    kind = online_hadamard_type(transform_type, head_dim, f"R3 (head_dim {head_dim})")
    return TransformScheme(
        type=kind,
        randomize=randomize,
        requires_grad=False,
        precision=precision,
        head_dim=head_dim,
        apply=[
            TransformArgs(targets=attention_classes, location="q_attn"),
            TransformArgs(targets=attention_classes, location="k_cache"),
        ],
    )


def is_r3_scheme(scheme: TransformScheme) -> bool:
    """Whether the scheme rotates queries or keys inside attention (R3)."""
    return any(args.location in R3_LOCATIONS for args in scheme.apply)


def _cache_argument(module: torch.nn.Module) -> tuple[str, int]:
    parameters = list(inspect.signature(module.forward).parameters)
    name = next((n for n in _CACHE_ARGUMENTS if n in parameters), None)
    if name is None:
        raise ValueError(
            f"R3: {type(module).__name__}.forward takes no cache argument "
            f"({' / '.join(_CACHE_ARGUMENTS)}), through which the keys would be rotated"
        )
    return name, parameters.index(name)


class _RotatedKeys:
    """Stands in for one attention forward's cache: rotates the keys, then hands them on."""

    def __init__(self, rotation: torch.nn.Module, cache: Any) -> None:
        self._rotation, self._cache = rotation, cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kw: Any):
        key_states = self._rotation(key_states)
        if self._cache is None:
            return key_states, value_states
        return self._cache.update(key_states, value_states, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        # a model may read the cache's other attributes (its layers, its length)
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise AttributeError(name)
        return getattr(cache, name)


def _rotate_keys_hook(argument: str, position: int) -> Any:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        rotation = module.R3_k_cache
        if position < len(args):
            args = (*args[:position], _RotatedKeys(rotation, args[position]), *args[position + 1 :])
        else:
            kwargs[argument] = _RotatedKeys(rotation, kwargs.get(argument))
        return args, kwargs

    return hook


def _r3_attention(module: torch.nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    rotation = getattr(module, "R3_q_attn", None)
    if rotation is not None:
        query = rotation(query)
    inner_name = module.config._attn_implementation.removeprefix(_PREFIX)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(inner_name, eager)
    if inner is None:
        raise RuntimeError(f"R3: no attention implementation {inner_name!r} to hand on to")
    return inner(module, query, *args, **kwargs)


def _use_r3_attention(model: torch.nn.Module) -> None:
    current = model.config._attn_implementation  # type: ignore[union-attr]
    if current.startswith(_PREFIX):
        return
    name = _PREFIX + current
    AttentionInterface.register(name, _r3_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)  # type: ignore[operator]


@torch.no_grad()
def attach_r3(
    model: torch.nn.Module, attention: dict[str, torch.nn.Module], scheme: TransformScheme
) -> int:
    """Rotate the queries and keys of ``attention`` modules by the scheme's Hadamard.

    :param model: the transformers model (its attention implementation is wrapped)
    :param attention: the attention modules by name (``q_proj`` / ``k_proj`` and a cache
        argument)
    :param scheme: an R3 scheme (:func:`r3_scheme`)
    :return: how many attention modules were rotated
    """
    factory = TransformFactory.from_scheme(scheme, name="R3")
    for name, module in attention.items():
        if hasattr(module, "R3_q_attn") or hasattr(module, "R3_k_cache"):
            raise RuntimeError(f"{name}: R3 is already attached")
        argument, position = _cache_argument(module)
        for location in R3_LOCATIONS:
            args = TransformArgs(targets=[type(module).__name__], location=location)
            transform = factory.create_transform(module, args)
            # one matrix per module: a checkpoint holds no shared tensors
            transform.weight = torch.nn.Parameter(transform.weight.detach().clone(), False)
            if getattr(transform, "perm", None) is not None:
                transform.perm = torch.nn.Parameter(transform.perm.detach().clone(), False)
            module.register_module(f"R3_{location}", transform)
        module.register_forward_pre_hook(_rotate_keys_hook(argument, position), with_kwargs=True)
    _use_r3_attention(model)
    logger.info(
        "online rotation R3 ({}) on the queries and keys of {}", scheme.type, len(attention)
    )
    return len(attention)


def apply_online_rotations(model: torch.nn.Module, config: TransformConfig) -> None:
    """Apply every online scheme of ``config`` (R4 through compressed-tensors, R3 here, in the
    config's order) and record them in the model's ``transform_config``.

    :raises ValueError: for a scheme this library cannot apply, or targets matching nothing
    """
    for name, scheme in config.config_groups.items():
        check_online_scheme(name, scheme)
        one = TransformConfig(config_groups={name: scheme})
        if not is_r3_scheme(scheme):
            apply_input_rotations(model, one)
        else:
            if any(args.location not in R3_LOCATIONS for args in scheme.apply):
                raise ValueError(
                    f"transform_config.config_groups.{name}: q_attn / k_cache rotations cannot "
                    "share a scheme with other locations"
                )
            targets = [t for args in scheme.apply for t in args.targets]
            ignore = [i for args in scheme.apply for i in args.ignore]
            found = dict(match_named_modules(model, targets, ignore))
            if not found:
                raise ValueError(f"rotation {name}: targets {targets} match no attention module")
            attach_r3(model, found, scheme)
        record_transform_config(model, one)

"""Online rotations (SpinQuant's R3 and R4) as compressed-tensors transforms.

An online rotation multiplies activations at runtime, so it lives in the model as
compressed-tensors' transform modules (``TransformScheme`` / ``TransformArgs``, applied by
``apply_transform_config``) and is recorded in the model's ``transform_config``, which the
checkpoint's ``config.json`` carries for runtimes (vLLM) and loaders to rebuild it.

- **R4**: a Hadamard ``H`` on ``down_proj``'s input (``location: input``) with its inverse fused
  into ``down_proj``'s weight (``weight_input``, ``inverse: true``): the full-precision model is
  unchanged, and the quantized input of ``down_proj`` (the MLP's widest, most outlier-prone
  activation) is spread out. ``block_size`` makes ``H`` block-diagonal.
- **R3**: a Hadamard per head on the queries and keys after the rotary embedding
  (``q_attn`` / ``k_cache``): ``q . k`` is unchanged and a quantized key cache sees rotated keys.
  (``spinquant/online_attention.py``, which also applies a whole online config:
  ``apply_online_rotations``).

compressed-tensors builds ``hadamard`` (Sylvester) for powers of two only and
``random-hadamard`` (a known order ``k`` times a power of two, with random signs) for the other
orders it has tables for: an online Hadamard of another order uses ``random-hadamard``.
"""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.transform import (
    TransformArgs,
    TransformConfig,
    TransformScheme,
    apply_transform_config,
)
from compressed_tensors.transform.utils.hadamard import is_pow2
from loguru import logger

from compressor.modifiers.transform.spinquant.matrices import (
    hadamard_supported,
    supported_hadamard_orders,
)

__all__ = [
    "ONLINE_LOCATIONS",
    "ONLINE_TYPES",
    "TRANSFORM_CONFIG_ATTR",
    "apply_input_rotations",
    "record_transform_config",
    "check_online_scheme",
    "is_online_scheme",
    "online_hadamard_type",
    "online_part",
    "r4_scheme",
    "split_transform_config",
    "working_block_sizes",
]

ONLINE_TYPES = ("hadamard", "random-hadamard")
# an online scheme's arguments: the runtime side and the inverse fused into a weight
ONLINE_LOCATIONS = ("input", "q_attn", "k_cache")
_SCHEME_LOCATIONS = (*ONLINE_LOCATIONS, "weight_input")
TRANSFORM_CONFIG_ATTR = "transform_config"  # compressed-tensors' attribute on the model


def working_block_sizes(width: int) -> list[int]:
    """The divisors of ``width`` that a Hadamard matrix can have as its order, largest first."""
    return [d for d in range(width, 0, -1) if width % d == 0 and hadamard_supported(d)]


def online_hadamard_type(transform_type: str, size: int, where: str) -> str:
    """The compressed-tensors transform type that builds an online Hadamard of order ``size``.

    :param transform_type: ``hadamard`` or ``random-hadamard``
    :param size: the order (the width, or the block size)
    :param where: names the rotation and the module, for the errors
    :raises ValueError: for another type, or an order with no Hadamard construction (naming
        the sizes that work and the block sizes that divide it)
    """
    if transform_type not in ONLINE_TYPES:
        raise ValueError(
            f"{where}: transform_type={transform_type!r} cannot be an online rotation; allowed: "
            f"{', '.join(ONLINE_TYPES)} (compressed-tensors' online random-matrix is not "
            "orthogonal, so it would not spread outliers evenly)"
        )
    if is_pow2(size):
        return transform_type
    if not hadamard_supported(size):
        odd = [k for k in supported_hadamard_orders() if not is_pow2(k)]
        blocks = working_block_sizes(size)[:6]
        raise ValueError(
            f"{where}: no Hadamard matrix of order {size} can be built; orders that work are "
            f"powers of two and k * 2**m with k in compressed-tensors' known orders "
            f"({', '.join(map(str, odd[:3]))}, ... {odd[-1] if odd else '-'}); set "
            f"transform_block_size to one dividing {size}: {blocks}"
        )
    return "random-hadamard"


def r4_scheme(
    model: torch.nn.Module,
    targets: list[str],
    transform_type: str,
    *,
    block_size: int | None,
    randomize: bool,
    precision: torch.dtype,
) -> TransformScheme:
    """R4: a Hadamard on the input of ``targets`` (down_proj) and its inverse in their weight.

    :param model: the model (the targets' input widths give the order)
    :param targets: the MLP output projections (match strings)
    :param transform_type: ``hadamard`` or ``random-hadamard``
    :param block_size: a block-diagonal matrix of this order, or None for one over the width
    :param randomize: a random permutation of the Hadamard matrix (``hadamard`` only)
    :param precision: the dtype the online multiplication runs in
    :raises ValueError: when the targets match no Linear, a block size does not divide a
        width, or an order has no Hadamard construction
    """
    from compressed_tensors.utils import match_named_modules

    found = list(match_named_modules(model, targets))
    if not found or not all(isinstance(m, torch.nn.Linear) for _, m in found):
        raise ValueError(f"R4: targets {targets} must match Linear modules (down_proj)")
    kinds, sizes = set(), set()
    for name, module in found:
        width = module.in_features
        if block_size is not None and width % block_size != 0:
            raise ValueError(
                f"R4: transform_block_size={block_size} does not divide the input width {width} "
                f"of {name}; block sizes that work: {working_block_sizes(width)[:6]}"
            )
        kinds.add(online_hadamard_type(transform_type, block_size or width, f"R4 on {name}"))
        sizes.add(block_size or width)
    kind = "random-hadamard" if "random-hadamard" in kinds else transform_type
    if kind != transform_type:
        logger.info(
            "R4: compressed-tensors builds a plain `hadamard` for powers of two only; order(s) "
            "{} use its `random-hadamard` (a known order times a power of two, random signs)",
            sorted(sizes),
        )
    return TransformScheme(
        type=kind,
        randomize=randomize,
        requires_grad=False,
        precision=precision,
        head_dim=block_size,
        apply=[
            TransformArgs(targets=targets, location="input"),
            TransformArgs(targets=targets, location="weight_input", inverse=True),
        ],
    )


def is_online_scheme(scheme: TransformScheme) -> bool:
    """Whether any of the scheme's arguments acts at runtime (not fused into a weight)."""
    return any(args.is_online() for args in scheme.apply)


def check_online_scheme(name: str, scheme: TransformScheme) -> None:
    """Reject an online scheme this library cannot apply exactly.

    :raises ValueError: naming the scheme, the field, the value and the allowed values
    """
    if scheme.type not in ONLINE_TYPES:
        raise ValueError(
            f"transform_config.config_groups.{name}.type {scheme.type!r}: an online rotation "
            f"must be one of {', '.join(ONLINE_TYPES)}"
        )
    if scheme.requires_grad:
        raise ValueError(
            f"transform_config.config_groups.{name}.requires_grad=True: online rotations are "
            "fixed here"
        )
    for args in scheme.apply:
        if args.location not in _SCHEME_LOCATIONS:
            raise ValueError(
                f"transform_config.config_groups.{name}: location {args.location!r} cannot be "
                f"part of an online rotation; allowed: {', '.join(_SCHEME_LOCATIONS)}"
            )


def split_transform_config(config: TransformConfig) -> tuple[TransformConfig, TransformConfig]:
    """The fused schemes (every argument a weight location) and the online ones, in order."""
    fused = {n: s for n, s in config.config_groups.items() if not is_online_scheme(s)}
    online = {n: s for n, s in config.config_groups.items() if is_online_scheme(s)}
    return TransformConfig(config_groups=fused), TransformConfig(config_groups=online)


def online_part(config: TransformConfig) -> TransformConfig:
    """Only the runtime arguments of the online schemes: what a model whose weights already hold
    the fused inverses (a reloaded checkpoint) still needs."""
    groups: dict[str, TransformScheme] = {}
    for name, scheme in config.config_groups.items():
        runtime = [args for args in scheme.apply if args.is_online()]
        if runtime:
            groups[name] = scheme.model_copy(update={"apply": runtime}, deep=True)
    return TransformConfig(config_groups=groups)


def record_transform_config(model: torch.nn.Module, config: TransformConfig) -> None:
    """Add ``config``'s schemes to the model's ``transform_config`` (what a checkpoint saves),
    after any recorded before."""
    previous: Any = getattr(model, TRANSFORM_CONFIG_ATTR, None)
    merged = (
        previous.model_copy(deep=True)
        if isinstance(previous, TransformConfig)
        else TransformConfig(config_groups={})
    )
    merged.merge(config.model_copy(deep=True))
    setattr(model, TRANSFORM_CONFIG_ATTR, merged)


def apply_input_rotations(model: torch.nn.Module, config: TransformConfig) -> dict[str, int]:
    """Apply online schemes on Linear inputs (R4) with compressed-tensors: their fused inverses
    go into the weights, their runtime parts become transform submodules with hooks. The model's
    ``transform_config`` is left for the caller to record.

    :return: how many modules each scheme touched
    """
    from compressed_tensors.utils import match_named_modules

    counts = {
        name: sum(len(list(match_named_modules(model, a.targets, a.ignore))) for a in s.apply)
        for name, s in config.config_groups.items()
    }
    for name, scheme in config.config_groups.items():
        check_online_scheme(name, scheme)
        if counts[name] == 0:
            raise ValueError(f"rotation {name}: its targets match no module of the model")
    previous: Any = getattr(model, TRANSFORM_CONFIG_ATTR, None)
    apply_transform_config(model, config)
    setattr(model, TRANSFORM_CONFIG_ATTR, previous)  # the caller records what it applied
    for name, scheme in config.config_groups.items():
        logger.info("online rotation {} ({}) on {} module(s)", name, scheme.type, counts[name])
    return counts

"""Fuse a compressed-tensors ``TransformConfig`` of offline rotations into a model's weights.

Each ``TransformScheme`` is one rotation (R1, R2, ...); its ``TransformArgs`` say which modules
it touches and on which side (``weight_output``: the module's output, ``weight_input``: its
input; ``inverse`` applies the transpose). Within a scheme every module of a given size gets
the same matrix, so the rotations cancel between writers and readers. With ``randomize``, a
scheme whose modules all live inside decoder layers (R2) gets a distinct matrix per layer;
one that reaches outside them (R1, the residual stream) keeps one matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme
from compressed_tensors.utils import match_named_modules
from loguru import logger
from tqdm.auto import tqdm

from compressor.architectures import find_decoder_layers_path
from compressor.modifiers.transform.spinquant.fusion import rotate_input, rotate_output
from compressor.modifiers.transform.spinquant.matrices import TRANSFORM_TYPES, rotation_matrix

__all__ = ["FUSED_LOCATIONS", "apply_fused_transforms", "check_fused_config"]

FUSED_LOCATIONS = ("weight_input", "weight_output")


def check_fused_config(config: TransformConfig) -> TransformConfig:
    """Reject what cannot be fused into weights: other types, online locations, gradients.

    :raises ValueError: naming the scheme, the field, the value and the allowed values
    """
    for name, scheme in config.config_groups.items():
        if scheme.type not in TRANSFORM_TYPES:
            raise ValueError(
                f"transform_config.config_groups.{name}.type must be one of "
                f"{', '.join(TRANSFORM_TYPES)}; got {scheme.type!r}"
            )
        if scheme.requires_grad:
            raise ValueError(
                f"transform_config.config_groups.{name}.requires_grad=True: learned rotations "
                "are not supported; rotations are fused into the weights"
            )
        for args in scheme.apply:
            if args.location not in FUSED_LOCATIONS:
                raise ValueError(
                    f"transform_config.config_groups.{name}: location {args.location!r} is an "
                    "online rotation (R3/R4: spinquant.online_attention.apply_online_rotations); "
                    f"fused locations: {', '.join(FUSED_LOCATIONS)}"
                )
    return config


def _layer_key(name: str, layers_path: str | None) -> str | None:
    if layers_path is None or not name.startswith(layers_path + "."):
        return None
    return name[: len(layers_path) + 1] + name[len(layers_path) + 1 :].split(".", 1)[0]


def _width(module: torch.nn.Module, location: str) -> int:
    if isinstance(module, torch.nn.Linear):
        return module.in_features if location == "weight_input" else module.out_features
    if isinstance(module, torch.nn.Embedding) and location == "weight_output":
        return module.embedding_dim
    raise ValueError(
        f"cannot fuse a {location} rotation into {type(module).__name__}: only Linear "
        "(either side) and Embedding (output side) hold rotatable weights"
    )


def _targets(
    model: torch.nn.Module, scheme_name: str, args: TransformArgs
) -> list[tuple[str, torch.nn.Module]]:
    found = list(match_named_modules(model, args.targets, args.ignore))
    if not found:
        raise ValueError(
            f"rotation {scheme_name}: targets {args.targets} match no module of "
            f"{type(model).__name__}"
        )
    return found


@torch.no_grad()
def apply_fused_transforms(
    model: torch.nn.Module,
    config: TransformConfig,
    precision: torch.dtype = torch.float64,
    seed: int = 0,
    adjust: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, int]:
    """Fuse every scheme of ``config`` into the weights it targets.

    :param model: the model, changed in place
    :param config: offline rotations only (see :func:`check_fused_config`)
    :param precision: dtype the matrices are built and multiplied in
    :param seed: seeds the random matrices, so a run is reproducible
    :param adjust: called with the scheme's name and each matrix as it is built; the
        (orthogonal) matrix it returns is the one fused (LayerNorm models make R1 keep the
        stream zero-mean: ``centring.ones_preserving``)
    :return: how many modules each scheme rotated
    """
    check_fused_config(config)
    try:
        layers_path: str | None = find_decoder_layers_path(model)
    except ValueError:
        layers_path = None
    counts: dict[str, int] = {}
    for index, (name, scheme) in enumerate(config.config_groups.items()):
        counts[name] = _apply_scheme(
            model, name, scheme, precision, seed + index, layers_path, adjust
        )
        logger.info("rotation {} ({}) fused into {} modules", name, scheme.type, counts[name])
    return counts


def _apply_scheme(
    model: torch.nn.Module,
    name: str,
    scheme: TransformScheme,
    precision: torch.dtype,
    seed: int,
    layers_path: str | None,
    adjust: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> int:
    work = [
        (args, mname, module)
        for args in scheme.apply
        for mname, module in _targets(model, name, args)
    ]
    per_layer = scheme.randomize and all(_layer_key(m, layers_path) for _, m, _ in work)
    generator = torch.Generator().manual_seed(seed)
    matrices: dict[tuple[int, str | None], torch.Tensor] = {}
    for args, module_name, module in tqdm(work, desc=f"rotation {name}", leave=False):
        width = _width(module, args.location)
        size = scheme.head_dim or width
        if width % size != 0:
            raise ValueError(
                f"rotation {name}: head_dim {size} does not divide the width {width} of "
                f"{module_name} ({args.location})"
            )
        key = (size, _layer_key(module_name, layers_path) if per_layer else None)
        if key not in matrices:
            matrices[key] = rotation_matrix(
                scheme.type,  # type: ignore[arg-type]
                size,
                randomize=scheme.randomize,
                generator=generator,
                dtype=precision,
            )
            if adjust is not None:
                matrices[key] = adjust(name, matrices[key])
        matrix = matrices[key]
        if args.location == "weight_output":
            rotate_output(module, matrix.T if args.inverse else matrix, precision)
        else:
            rotate_input(module, matrix if args.inverse else matrix.T, precision)
    return len(work)

"""Weight surgery for fused rotations: untie embeddings, fold norm scales, rotate weights.

Pure functions on modules; each computes in a given ``precision`` and writes the result back
in the weight's own dtype. Conventions, for an orthogonal ``R`` (``R @ R.T == I``):

- ``rotate_output(module, R)``: the module's outputs become ``y @ R``
  (linear ``W <- R.T @ W``, ``b <- b @ R``; embedding ``E <- E @ R``)
- ``rotate_input(module, R)``: the linear expects inputs ``x @ R`` and computes what it did
  before (``W <- W @ R``)

A rotation smaller than the rotated side is applied block-diagonally, one block per head
(the same block for every head), which is how R2 rotates each attention head.
"""

from __future__ import annotations

import torch

from compressor.utils.embeddings import untie_word_embeddings

__all__ = [
    "fuse_norm_into_linears",
    "rotate_input",
    "rotate_output",
    "untie_word_embeddings",
]


def _blocks(width: int, rotation: torch.Tensor, side: str, module: torch.nn.Module) -> int:
    size = rotation.shape[0]
    if rotation.dim() != 2 or rotation.shape[1] != size:
        raise ValueError(f"a rotation must be square, got shape {tuple(rotation.shape)}")
    if width % size != 0:
        raise ValueError(
            f"a rotation of size {size} does not divide the {side} width {width} of "
            f"{type(module).__name__}"
        )
    return width // size


@torch.no_grad()
def rotate_output(
    module: torch.nn.Module, rotation: torch.Tensor, precision: torch.dtype = torch.float64
) -> None:
    """Rotate a linear's or an embedding's output: ``y -> y @ R`` (block-diagonal if smaller).

    :param module: a ``torch.nn.Linear`` or ``torch.nn.Embedding``
    :param rotation: an orthogonal ``(d, d)`` matrix; ``d`` divides the output width
    :param precision: dtype the product is computed in
    """
    rot = rotation.to(device=module.weight.device, dtype=precision)
    weight = module.weight
    if isinstance(module, torch.nn.Embedding):
        heads = _blocks(weight.shape[1], rot, "output", module)
        rows = weight.to(precision).unflatten(1, (heads, rot.shape[0]))
        weight.copy_((rows @ rot).flatten(1).to(weight.dtype))
        return
    if not isinstance(module, torch.nn.Linear):
        raise TypeError(
            f"rotate_output needs a Linear or an Embedding, got {type(module).__name__}"
        )
    heads = _blocks(weight.shape[0], rot, "output", module)
    blocks = weight.to(precision).unflatten(0, (heads, rot.shape[0]))  # (heads, d, in)
    weight.copy_((rot.T @ blocks).flatten(0, 1).to(weight.dtype))
    if module.bias is not None:
        bias = module.bias.to(precision).unflatten(0, (heads, rot.shape[0]))
        module.bias.copy_((bias @ rot).flatten().to(module.bias.dtype))


@torch.no_grad()
def rotate_input(
    module: torch.nn.Module, rotation: torch.Tensor, precision: torch.dtype = torch.float64
) -> None:
    """Make a linear read rotated inputs ``x @ R`` unchanged (block-diagonal if smaller).

    :param module: a ``torch.nn.Linear``
    :param rotation: an orthogonal ``(d, d)`` matrix; ``d`` divides the input width
    :param precision: dtype the product is computed in
    """
    if not isinstance(module, torch.nn.Linear):
        raise TypeError(f"rotate_input needs a Linear, got {type(module).__name__}")
    rot = rotation.to(device=module.weight.device, dtype=precision)
    weight = module.weight
    heads = _blocks(weight.shape[1], rot, "input", module)
    blocks = weight.to(precision).unflatten(1, (heads, rot.shape[0]))  # (out, heads, d)
    weight.copy_((blocks @ rot).flatten(1).to(weight.dtype))


@torch.no_grad()
def fuse_norm_into_linears(
    norm: torch.nn.Module,
    linears: list[torch.nn.Module],
    precision: torch.dtype = torch.float64,
) -> None:
    """Fold a norm's per-channel scale into the linears that read it; the scale becomes 1.

    ``linear(norm(x) * g) == linear'(norm(x))`` with ``W' = W * g`` (column-wise). Afterwards
    the norm only normalises, which commutes with an orthogonal rotation (RMSNorm).

    :param norm: a normalisation module with a 1-D ``weight`` and no ``bias``
    :param linears: every linear fed by ``norm``
    :param precision: dtype the product is computed in
    :raises ValueError: for a norm with a bias or without a scale
    """
    scale = getattr(norm, "weight", None)
    if not isinstance(scale, torch.Tensor) or scale.dim() != 1:
        raise ValueError(f"{type(norm).__name__} has no 1-D scale `weight` to fuse")
    if getattr(norm, "bias", None) is not None:
        raise ValueError(
            f"{type(norm).__name__} has a bias: only scale-only norms (RMSNorm) can be fused "
            "before a rotation"
        )
    for linear in linears:
        if not isinstance(linear, torch.nn.Linear) or linear.in_features != scale.numel():
            raise ValueError(
                f"cannot fuse a norm of width {scale.numel()} into {linear!r}: it must be a "
                "Linear reading that many features"
            )
        fused = linear.weight.to(precision) * scale.to(linear.weight.device, precision)
        linear.weight.copy_(fused.to(linear.weight.dtype))
    scale.fill_(1.0)

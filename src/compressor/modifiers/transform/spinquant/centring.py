"""LayerNorm models under R1: a zero-mean residual stream, and a rotation that keeps it so.

A LayerNorm subtracts its input's mean before scaling, and a rotation does not commute with
that: ``mean(x @ Q) != 0`` for a zero-mean ``x`` in general. SliceGPT (Ashkboos et al. 2024,
"SliceGPT: compress large language models by deleting rows and columns", arXiv:2401.15024,
section 3.2), whose conversion QuaRot (arXiv:2404.00456) and SpinQuant reuse for OPT, makes the
residual stream zero-mean instead, so that the LayerNorm's centring does nothing:

1. every module writing the stream (the token and position embeddings, each layer's attention
   output and MLP output projection) has the mean over the hidden width subtracted from its
   output (rows of an embedding, ``W <- C W`` and ``b <- C b`` for a Linear, with
   ``C = I - 11^T/d``): the stream becomes ``C x``, and a LayerNorm, which only ever sees
   ``C x``, computes exactly what it did;
2. each LayerNorm's scale ``g`` and bias ``b`` fold into the Linears it feeds:
   ``W <- W diag(g)``, ``b_lin <- b_lin + W b``; a Linear without a bias (OPT's ``lm_head``)
   cannot take ``W b``, so that norm keeps ``b / g`` as its bias, which R1 then rotates;
3. a LayerNorm without scale on a zero-mean input is an RMSNorm, which commutes with any
   rotation that keeps the stream zero-mean, that is one mapping the all-ones vector to itself.

SliceGPT and QuaRot then swap the LayerNorm modules for RMSNorm ones so that any rotation works;
here R1 is made to fix the all-ones vector instead (``ones_preserving``: the rotation followed
by the Householder reflection taking the image of the all-ones vector back to it, which changes
one direction out of ``d``), so the model keeps its LayerNorm modules and its checkpoint is an
ordinary one of its architecture, reloaded by ``from_pretrained`` as it is.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers.pytorch_utils import Conv1D

__all__ = [
    "centre_residual_writers",
    "check_centrable",
    "fuse_layer_norm_into_linears",
    "is_layer_norm",
    "ones_preserving",
    "rotate_norm_bias",
]


def is_layer_norm(module: torch.nn.Module) -> bool:
    """torch's LayerNorm, or a model's own class of that name that carries a bias."""
    return isinstance(module, torch.nn.LayerNorm) or (
        type(module).__name__.endswith("LayerNorm")
        and isinstance(getattr(module, "bias", None), torch.Tensor)
    )


def check_centrable(model: torch.nn.Module) -> None:
    """Refuse the LayerNorm layouts that centring cannot make exact.

    :raises ValueError: for post-norm blocks (``do_layer_norm_before: false``, OPT-350m: the
        stream itself is normalised, so no writer can be centred ahead of it), a projection
        between the embeddings and the stream (``word_embed_proj_dim`` differing from
        ``hidden_size``), or GPT-2's Conv1D layout
    """
    config = getattr(model, "config", None)
    if getattr(config, "do_layer_norm_before", True) is False:
        raise ValueError(
            f"{type(model).__name__}: config.do_layer_norm_before is False (post-norm blocks, "
            "as OPT-350m): the LayerNorm sits on the residual stream itself, so the stream "
            "cannot be rotated; only pre-norm LayerNorm models are supported"
        )
    proj = getattr(config, "word_embed_proj_dim", None)
    hidden = getattr(config, "hidden_size", None)
    if proj is not None and hidden is not None and proj != hidden:
        raise ValueError(
            f"{type(model).__name__}: config.word_embed_proj_dim={proj} differs from "
            f"hidden_size={hidden}: project_in / project_out sit between the embeddings and "
            "the stream; SpinQuant supports LayerNorm models without them"
        )
    conv = sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, Conv1D)}
    )
    if conv:
        raise ValueError(
            f"{type(model).__name__} projects with transformers' Conv1D ({', '.join(conv[:4])}: "
            "GPT-2's layout, transposed weights with queries, keys and values fused in one "
            "c_attn): R1/R2 cannot be fused into them; LayerNorm models with Linear "
            "projections (OPT) are supported"
        )


@torch.no_grad()
def centre_residual_writers(
    writers: list[torch.nn.Module], precision: torch.dtype = torch.float64
) -> None:
    """Subtract the mean over the hidden width from what each module writes to the stream.

    :param writers: Embeddings (each row centred) and Linears writing the stream (each column
        of the weight, and the bias, centred over the output features)
    :param precision: dtype the means are computed in
    :raises TypeError: for another kind of module
    """
    for module in writers:
        weight = cast(torch.Tensor, module.weight)
        if isinstance(module, torch.nn.Embedding):
            rows = weight.to(precision)
            weight.copy_((rows - rows.mean(dim=1, keepdim=True)).to(weight.dtype))
            continue
        if not isinstance(module, torch.nn.Linear):
            raise TypeError(
                f"a residual writer must be an Embedding or a Linear, got {type(module).__name__}"
            )
        columns = weight.to(precision)
        weight.copy_((columns - columns.mean(dim=0, keepdim=True)).to(weight.dtype))
        if module.bias is not None:
            bias = module.bias.to(precision)
            module.bias.copy_((bias - bias.mean()).to(module.bias.dtype))


@torch.no_grad()
def fuse_layer_norm_into_linears(
    norm: torch.nn.Module,
    linears: list[torch.nn.Module],
    precision: torch.dtype = torch.float64,
) -> bool:
    """Fold a LayerNorm's scale and bias into the Linears it feeds; its scale becomes 1.

    Each linear computes ``W (n * g + b) + c = (W diag(g)) n + (W b + c)``. When one of them
    has no bias to take ``W b``, the norm keeps ``b / g`` as its bias instead (which the caller
    rotates with the stream: ``rotate_norm_bias``).

    :param norm: a LayerNorm with a 1-D ``weight`` (and optionally a ``bias``)
    :param linears: every Linear fed by ``norm``
    :return: whether the norm kept a (non-zero) bias
    :raises ValueError: for a norm without a scale, a linear of another width, or a scale
        with zeros where a bias must be kept
    """
    scale = getattr(norm, "weight", None)
    if not isinstance(scale, torch.Tensor) or scale.dim() != 1:
        raise ValueError(f"{type(norm).__name__} has no 1-D scale `weight` to fuse")
    bias = getattr(norm, "bias", None)
    g = scale.to(precision)
    b = bias.to(precision) if isinstance(bias, torch.Tensor) and bool(bias.any()) else None
    for linear in linears:
        if not isinstance(linear, torch.nn.Linear) or linear.in_features != scale.numel():
            raise ValueError(
                f"cannot fuse a norm of width {scale.numel()} into {linear!r}: it must be a "
                "Linear reading that many features"
            )
    keep = b is not None and any(lin.bias is None for lin in linears)
    if keep and bool((g == 0).any()):
        raise ValueError(
            f"{type(norm).__name__} has a bias, zeros in its scale, and feeds a Linear without "
            "a bias: its bias can be neither folded nor kept as bias / scale"
        )
    for linear in cast(list[torch.nn.Linear], linears):
        weight = linear.weight.to(precision)
        if b is not None and not keep:
            fused_bias = weight @ b.to(weight.device)
            linear.bias.copy_((linear.bias.to(precision) + fused_bias).to(linear.bias.dtype))
        linear.weight.copy_((weight * g.to(weight.device)).to(linear.weight.dtype))
    if isinstance(bias, torch.Tensor):
        bias.copy_((b / g).to(bias.dtype) if keep and b is not None else torch.zeros_like(bias))
    scale.fill_(1.0)
    return keep


def ones_preserving(rotation: torch.Tensor) -> torch.Tensor:
    """``rotation`` followed by the Householder reflection that maps the image of the
    all-ones row vector back to it: an orthogonal ``Q`` with ``1 @ Q == 1``, equal to
    ``rotation`` on every direction orthogonal to both.

    :param rotation: an orthogonal ``(d, d)`` matrix (rows act on row vectors, ``y = x @ R``)
    """
    dtype = rotation.dtype
    r = rotation.to(torch.float64)
    ones = torch.ones(r.shape[0], dtype=torch.float64, device=r.device)
    image = ones @ r
    w = image - ones
    norm = torch.linalg.vector_norm(w)
    if norm < 1e-12 * ones.numel():
        return rotation  # already fixes it (a regular Hadamard matrix does)
    w = w / norm
    # x @ (I - 2 w w^T) reflects across the hyperplane orthogonal to w: image -> ones
    return (r - 2 * torch.outer(r @ w, w)).to(dtype)


@torch.no_grad()
def rotate_norm_bias(
    norm: torch.nn.Module, rotation: torch.Tensor, precision: torch.dtype = torch.float64
) -> None:
    """Rotate a norm's kept bias with the stream: ``b <- b @ R`` (block-diagonal if smaller)."""
    bias = cast(torch.Tensor, norm.bias)
    rot = rotation.to(device=bias.device, dtype=precision)
    blocks = bias.to(precision).unflatten(0, (-1, rot.shape[0]))
    bias.copy_((blocks @ rot).flatten().to(bias.dtype))

"""The loss SpinQuant's rotations are learned on: the rotated model, fake-quantized.

Where each rotation goes (``rotation_plan``: one side of one module per entry, from the
architecture's ``SpinQuantMapping``), and the next-token cross-entropy of the model whose
weights are rotated as ``fusion.rotate_output`` / ``rotate_input`` would leave them, computed
differentiably in the rotations (``torch.func.functional_call``: the model itself is not
changed), with every Linear of the decoder layers fake-quantizing its weight and its input.
Rounding is bypassed in the backward pass by a straight-through estimator (Bengio et al.
2013), as SpinQuant does (Liu et al. 2024, arXiv:2405.16406, section 3.2).

When no weight quantizer is in the loop (activations only), the rotated weights are never
needed themselves: a Linear reading rotated inputs computes ``q(x) (W R)^T = (q(x) R^T) W^T``
and one writing them ``y R``, so the loss rotates the activations instead (hooks around the
unchanged modules). It is the same function of the rotations, with the same gradient (up to
rounding: in float32 a last-bit difference can flip a 4-bit rounding, as any reordering of
the products can), but a step costs products of the size of the tokens rather than of every
weight matrix, and no gradient with respect to the rotated weights is formed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.utils import match_named_modules

from compressor.architectures import find_decoder_layers, find_decoder_layers_path
from compressor.modifiers.quantization.fake_quant import (
    fake_quantize_activation,
    fake_quantize_weight,
    fused_fake_quantize,
    straight_through,
)
from compressor.modifiers.transform.spinquant.mappings import SpinQuantMapping

__all__ = [
    "LEARN_LOSSES",
    "LearnLoss",
    "LoopQuantizers",
    "RotatedSide",
    "quantized_linears",
    "quantized_loss",
    "rotate_last",
    "rotation_plan",
]

LearnLoss = Literal["cross_entropy", "kl_to_full_precision"]
LEARN_LOSSES: tuple[str, ...] = ("cross_entropy", "kl_to_full_precision")
"""What the rotations are learned on: the quantized model's next-token cross-entropy (the
SpinQuant paper's), or the KL divergence from the full-precision model's next-token
distribution to the quantized one's on the same tokens. The rotations leave the
full-precision model unchanged, so the KL measures only what quantization loses: the
difficulty of the text, which dominates each batch's cross-entropy, cancels out."""


@dataclass(frozen=True)
class RotatedSide:
    """One side of one module that a rotation turns.

    :param name: the module's name in the model
    :param module: a Linear (either side) or an Embedding (output side)
    :param side: ``output`` (the module writes rotated values) or ``input`` (it reads them)
    :param key: which rotation: ``R1``, or ``R2:<decoder layer>`` (one R2 per layer)
    """

    name: str
    module: torch.nn.Module
    side: Literal["output", "input"]
    key: str


@dataclass(frozen=True)
class LoopQuantizers:
    """The fake quantizers in the training loop, on every Linear of the decoder layers.

    :param weights: the weights' quantization args (None: weights stay in full precision)
    :param activations: the inputs' args, dynamic (None: inputs stay in full precision)
    """

    weights: QuantizationArgs | None = None
    activations: QuantizationArgs | None = None


def rotation_plan(
    model: torch.nn.Module, mapping: SpinQuantMapping, rotations: Iterable[str]
) -> list[RotatedSide]:
    """Every module side the rotations turn: R1 on the embedding and the residual writers
    (output) and the residual readers with lm_head (input); R2 on each layer's ``attn_v``
    (output) and ``attn_o`` (input)."""
    chosen = set(rotations)
    plan: list[RotatedSide] = []
    if "R1" in chosen:
        for name, module in match_named_modules(
            model, [*mapping.embeddings, *mapping.residual_writers]
        ):
            plan.append(RotatedSide(name, module, "output", "R1"))
        for name, module in match_named_modules(model, mapping.residual_readers):
            plan.append(RotatedSide(name, module, "input", "R1"))
    if "R2" in chosen:
        layers = find_decoder_layers_path(model)
        for targets, side in (([mapping.attn_v], "output"), ([mapping.attn_o], "input")):
            for name, module in match_named_modules(model, targets):
                layer = _layer_of(name, layers)
                plan.append(RotatedSide(name, module, side, f"R2:{layer}"))  # type: ignore[arg-type]
    owners: dict[int, str] = {}
    for entry in plan:
        owner = owners.setdefault(id(entry.module.weight), entry.name)
        if owner != entry.name:
            raise ValueError(
                f"{owner} and {entry.name} share one weight (tied embeddings): untie them "
                "before rotating (fusion.untie_word_embeddings)"
            )
    return plan


def _layer_of(name: str, layers_path: str) -> str:
    if not name.startswith(layers_path + "."):
        raise ValueError(f"R2 rotates {name}, which lies outside the decoder layers {layers_path}")
    return name[len(layers_path) + 1 :].split(".", 1)[0]


def _rotated(
    weight: torch.Tensor, rotation: torch.Tensor, side: str, embedding: bool
) -> torch.Tensor:
    """``weight`` as ``fusion.rotate_output`` / ``rotate_input`` would leave it, differentiably
    in ``rotation`` (block-diagonal when the rotation is smaller than the side)."""
    r = rotation.to(weight.dtype)
    d = r.shape[0]
    if embedding or side == "input":
        return (weight.unflatten(1, (-1, d)) @ r).flatten(1)
    return (r.T @ weight.unflatten(0, (-1, d))).flatten(0, 1)


def _fake_quant(x: torch.Tensor, args: QuantizationArgs, role: str, where: str) -> torch.Tensor:
    fused = fused_fake_quantize(x, args, role, where)
    if fused is not None:
        return fused
    if role == "weight":
        return straight_through(x, fake_quantize_weight(x, args, where=where))
    return straight_through(x, fake_quantize_activation(x, args))


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every Linear of the decoder layers, by name: where the loop's quantizers sit (the
    Linears a recipe quantizes, ``lm_head`` left out)."""
    path, layers = find_decoder_layers(model)
    return {
        f"{path}.{name}": module
        for name, module in layers.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def _parameters(
    plan: list[RotatedSide],
    rotations: Mapping[str, torch.Tensor],
    linears: Mapping[str, torch.nn.Linear],
    quantizers: LoopQuantizers,
) -> dict[str, torch.Tensor]:
    """The rotated (and fake-quantized) weights and biases, by parameter name."""
    out: dict[str, torch.Tensor] = {}
    for side in plan:
        weight_name = f"{side.name}.weight"
        weight = out.get(weight_name, cast(torch.Tensor, side.module.weight))
        embedding = isinstance(side.module, torch.nn.Embedding)
        out[weight_name] = _rotated(weight, rotations[side.key], side.side, embedding)
        bias = getattr(side.module, "bias", None)
        if side.side == "output" and bias is not None:
            bias_name = f"{side.name}.bias"
            current = out.get(bias_name, bias)
            r = rotations[side.key].to(current.dtype)
            out[bias_name] = (current.unflatten(0, (-1, r.shape[0])) @ r).flatten()
    if quantizers.weights is not None:
        for name, linear in linears.items():
            weight_name = f"{name}.weight"
            weight = out.get(weight_name, linear.weight)
            out[weight_name] = _fake_quant(weight, quantizers.weights, "weight", name)
    return out


@contextlib.contextmanager
def _quantized_inputs(
    linears: Mapping[str, torch.nn.Linear], args: QuantizationArgs | None
) -> Iterator[None]:
    """Fake-quantize every linear's input (with a straight-through gradient) inside the block."""
    handles = []
    if args is not None:
        for name, linear in linears.items():

            def hook(_module: Any, inputs: tuple[Any, ...], where: str = name) -> tuple[Any, ...]:
                return (_fake_quant(inputs[0], args, "activation", where), *inputs[1:])

            handles.append(linear.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def rotate_last(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``x``'s last dimension times ``rotation`` (block-diagonal when it is smaller)."""
    r = rotation.to(x.dtype)
    return (x.unflatten(-1, (-1, r.shape[0])) @ r).flatten(-2)


@contextlib.contextmanager
def _rotated_activations(
    plan: list[RotatedSide], rotations: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Inside the block, every module of ``plan`` computes what its rotated weights would:
    an output side's output times ``R`` (an Embedding's rows, a Linear's output with its
    bias: ``x (R^T W)^T + b R = (x W^T + b) R``), an input side's input times ``R^T`` (``x (W
    R)^T = (x R^T) W^T``). Entered after ``_quantized_inputs``, so that an input is quantized
    before it is turned back, as the rotated Linear quantizes it."""
    seen: set[tuple[int, str]] = set()
    handles = []
    try:
        for side in plan:
            if (id(side.module), side.side) in seen:
                raise ValueError(
                    f"{side.name} is rotated twice on its {side.side} side; the loss with "
                    "rotated activations takes one rotation a side"
                )
            seen.add((id(side.module), side.side))
            rotation = rotations[side.key]
            if side.side == "output":

                def after(_m: Any, _i: Any, out: torch.Tensor, r: torch.Tensor = rotation) -> Any:
                    return rotate_last(out, r)

                handles.append(side.module.register_forward_hook(after))
            else:

                def before(_m: Any, inputs: tuple[Any, ...], r: torch.Tensor = rotation) -> Any:
                    return (rotate_last(inputs[0], r.T), *inputs[1:])

                handles.append(side.module.register_forward_pre_hook(before))
        yield
    finally:
        for handle in handles:
            handle.remove()


def quantized_loss(
    model: torch.nn.Module,
    plan: list[RotatedSide],
    rotations: Mapping[str, torch.Tensor],
    batch: Mapping[str, Any],
    quantizers: LoopQuantizers,
    linears: Mapping[str, torch.nn.Linear] | None = None,
    rotate_weights: bool | None = None,
    loss: LearnLoss = "cross_entropy",
) -> torch.Tensor:
    """The loss of the rotated, fake-quantized model on ``batch`` (padding, where
    ``attention_mask`` is 0, left out), differentiable in ``rotations``: its next-token
    cross-entropy, or its KL divergence from the full-precision model (``LEARN_LOSSES``).

    :param model: the model, norms fused and embeddings untied; left unchanged
    :param plan: where the rotations go (``rotation_plan``)
    :param rotations: each rotation of the plan, by key
    :param batch: ``input_ids`` and optionally ``attention_mask``, on the model's device
    :param quantizers: the fake quantizers of the decoder layers' Linears
    :param linears: those Linears by name (``quantized_linears``), when already known
    :param rotate_weights: rotate the weights (True) or the activations (False, the same
        function; refused with a weight quantizer, which needs the rotated weights); None:
        the weights only when a weight quantizer is in the loop
    :param loss: ``cross_entropy`` or ``kl_to_full_precision`` (``LEARN_LOSSES``): the mean
        over the tokens of ``KL(p_full || p_quantized)`` of their next-token distributions,
        the full-precision model (the model as given, no quantizer) run without gradient
    """
    if loss not in LEARN_LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LEARN_LOSSES)}; got {loss!r}")
    if rotate_weights is None:
        rotate_weights = quantizers.weights is not None
    if not rotate_weights and quantizers.weights is not None:
        raise ValueError(
            "rotate_weights=False with a weight quantizer in the loop: the quantizer needs "
            "the rotated weights; allowed: True or None"
        )
    linears = quantized_linears(model) if linears is None else linears
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if mask is not None:
        kwargs["attention_mask"] = mask
    reference = None
    if loss == "kl_to_full_precision":
        with torch.no_grad():
            reference = model(**kwargs).logits
    if rotate_weights:
        params = _parameters(plan, rotations, linears, quantizers)
        with _quantized_inputs(linears, quantizers.activations):
            logits = torch.func.functional_call(model, params, args=(), kwargs=kwargs).logits
    else:
        with (
            _quantized_inputs(linears, quantizers.activations),
            _rotated_activations(plan, rotations),
        ):
            logits = model(**kwargs).logits
    if reference is not None:
        return _kl_divergence(reference, logits, mask)
    targets = ids[:, 1:]
    if mask is not None:
        targets = targets.masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(
        _at_least_float32(logits[:, :-1].flatten(0, 1)), targets.flatten(), ignore_index=-100
    )


def _kl_divergence(
    reference: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean over the (unmasked) tokens of ``KL(softmax(reference) || softmax(logits))``."""
    target = torch.log_softmax(_at_least_float32(reference), dim=-1)
    log_q = torch.log_softmax(_at_least_float32(logits), dim=-1)
    per_token = (target.exp() * (target - log_q)).sum(-1)
    if mask is None:
        return per_token.mean()
    keep = mask.to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum()


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 for the loss; float64 ones kept (gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))

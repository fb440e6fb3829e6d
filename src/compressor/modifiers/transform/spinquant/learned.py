"""Learned rotations: R1 and R2 trained on calibration data with the quantizers in the loop.

SpinQuant's own method (Liu et al. 2024, "SpinQuant: LLM quantization with learned
rotations", arXiv:2405.16406, section 3.2): the model's weights stay frozen; the rotations,
initialised from the fixed ones (Hadamard or random), are trained by Cayley SGD
(``cayley.py``) to minimise the next-token cross-entropy of the rotated model whose linears
fake-quantize their weights and inputs (``rotated_model.py``). R1 is one matrix for the residual stream; R2 one matrix per
decoder layer (each layer's heads share it), as in the paper. The learned matrices are then
fused exactly as fixed rotations are (``fusion.rotate_output`` / ``rotate_input``).

Only the cross-entropy of the *quantized* model depends on the rotations: without quantizers
the rotated model computes the same function, so at least one quantizer must be in the loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from loguru import logger
from tqdm.auto import tqdm

from compressor.modifiers.transform.spinquant.cayley import cayley_sgd_step, orthogonality_error
from compressor.modifiers.transform.spinquant.fusion import rotate_input, rotate_output
from compressor.modifiers.transform.spinquant.input_ranges import (
    TOKENS_PER_STEP,
    learn_on_input_ranges,
)
from compressor.modifiers.transform.spinquant.learn_batches import on_device, step_batches
from compressor.modifiers.transform.spinquant.mappings import SpinQuantMapping
from compressor.modifiers.transform.spinquant.matrices import TransformType, rotation_matrix
from compressor.modifiers.transform.spinquant.rotated_model import (
    LearnLoss,
    LoopQuantizers,
    RotatedSide,
    quantized_linears,
    quantized_loss,
    rotation_plan,
)

__all__ = [
    "LearnedRotations",
    "check_learning_arguments",
    "fuse_rotations",
    "initial_rotations",
    "learn_and_fuse",
    "learn_rotations",
]


@dataclass
class LearnedRotations:
    """What training produced.

    :param rotations: each rotation (``R1``, ``R2:<layer>``), orthogonal, in float64
    :param losses: the loss of every step, in order
    :param seconds: wall time of the training loop
    """

    rotations: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def check_learning_arguments(
    learnable: bool,
    learn_fields: list[str],
    *,
    has_transform_config: bool,
    weights: QuantizationArgs | None,
    activations: QuantizationArgs | None,
    loss: str = "cross_entropy",
    batch_size: int | None = None,
) -> None:
    """SpinQuantModifier's rules for its ``learn_*`` fields.

    :param learn_fields: the ``learn_*`` fields the recipe set
    :param loss: ``learn_loss``; ``batch_size``: ``learn_batch_size``
    :raises ValueError: naming the field and what is allowed
    """
    if not learnable:
        if learn_fields:
            raise ValueError(f"{', '.join(learn_fields)} set but learnable is False; drop them")
        return
    if has_transform_config:
        raise ValueError(
            "learnable=True with transform_config: learned rotations are built from "
            "`rotations` and `mappings`; drop transform_config"
        )
    if weights is None and activations is None:
        raise ValueError(
            "learnable=True needs a quantizer in the loop (learn_weights and/or "
            "learn_activations): without one the rotated model computes the same function "
            "and nothing is learned"
        )
    if activations is not None and not activations.dynamic:
        raise ValueError(
            "learn_activations.dynamic must be true: the loop computes each input's scale "
            "from the input itself (no observed static ranges)"
        )
    if loss != "input_range":
        return
    if weights is not None:
        raise ValueError(
            "learn_loss input_range learns on the ranges of the activations only; drop "
            "learn_weights (the recipe's weight scheme still applies after), or use learn_loss "
            "cross_entropy or kl_to_full_precision to learn with the weights quantized"
        )
    if activations is None or activations.strategy != QuantizationStrategy.TOKEN:
        got = None if activations is None else activations.strategy
        raise ValueError(
            "learn_loss input_range needs learn_activations with strategy token (per-token "
            f"dynamic ranges, which it minimises); got strategy {got}"
        )
    if batch_size is not None:
        raise ValueError(
            "learn_batch_size regroups the sequences of a cross-entropy step; learn_loss "
            f"input_range draws {TOKENS_PER_STEP} tokens of each input per step: drop "
            "learn_batch_size"
        )


def initial_rotations(
    plan: list[RotatedSide],
    transform_type: TransformType,
    sizes: Mapping[str, int],
    *,
    randomize: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The starting point of training: the fixed rotation of each key, in float64.

    Without ``randomize`` every layer's R2 starts from the same matrix (the fixed R2); with
    it, each layer draws its own, as fixed rotations do.

    :param sizes: the order of each rotation: ``R1`` (the hidden size), ``R2`` (head_dim)
    """
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(side.key for side in plan):
        kind = key.split(":", 1)[0]
        if kind in shared and not randomize:
            out[key] = shared[kind].clone()
            continue
        out[key] = rotation_matrix(
            transform_type, sizes[kind], randomize=randomize, generator=generator
        )
        shared.setdefault(kind, out[key])
    return out


# ---------------------------------------------------------------- training
def learn_rotations(
    model: torch.nn.Module,
    plan: list[RotatedSide],
    rotations: Mapping[str, torch.Tensor],
    batches: Iterable[Any],
    quantizers: LoopQuantizers,
    *,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    batch_rows: int | None = None,
    loss: LearnLoss = "cross_entropy",
    accumulate: int = 1,
) -> LearnedRotations:
    """Train the rotations by Cayley SGD on the quantized model's loss (``quantized_loss``).

    One batch per step, cycling through ``batches`` (or ``batch_rows`` of their rows per step,
    ``step_batches``); the learning rate decays linearly to 0
    over ``steps`` (as SpinQuant's training does). The model is left unchanged: its
    parameters' ``requires_grad`` are switched off during the loop and restored after.

    :param rotations: the starting rotations (``initial_rotations``)
    :param batches: dicts with ``input_ids`` (and ``attention_mask``); a list or a DataLoader
    :param steps: how many steps; ``lr``, ``momentum``: Cayley SGD's
    :param batch_rows: sequences per step, regrouped from ``batches``; None: as they come
    :param loss: ``cross_entropy`` or ``kl_to_full_precision`` (``quantized_loss``)
    :param accumulate: batches per step, their gradients averaged (each run on its own, so
        a step sees ``accumulate`` times the rows for the memory of one batch)
    :return: the trained rotations (orthogonal, float64), every step's loss and the wall time
    """
    device = next(model.parameters()).device
    current = {
        k: r.detach().to(device, torch.float64).requires_grad_(True) for k, r in rotations.items()
    }
    buffers: dict[str, torch.Tensor | None] = dict.fromkeys(current)
    linears = quantized_linears(model)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    losses: list[float] = []
    began = time.perf_counter()
    try:
        for param, _ in frozen:
            param.requires_grad_(False)
        model.eval()
        data = step_batches(batches, batch_rows)
        bar = tqdm(range(steps), desc="learning rotations")
        for step in bar:
            total = 0.0
            grads: list[torch.Tensor] = []
            for _ in range(accumulate):
                batch = on_device(next(data), device)
                value = quantized_loss(model, plan, current, batch, quantizers, linears, loss=loss)
                parts = torch.autograd.grad(value / accumulate, list(current.values()))
                grads = (
                    list(parts) if not grads else [g + p for g, p in zip(grads, parts, strict=True)]
                )
                total += value.item() / accumulate
            rate = lr * (1 - step / steps)
            for (key, rotation), grad in zip(list(current.items()), grads, strict=True):
                updated, buffers[key] = cayley_sgd_step(
                    rotation.detach(), grad, buffers[key], rate, momentum
                )
                current[key] = updated.requires_grad_(True)
            losses.append(total)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if step % max(steps // 10, 1) == 0 or step == steps - 1:
                logger.debug("rotation step {}/{}: loss {:.4f}", step + 1, steps, losses[-1])
    finally:
        for param, flag in frozen:
            param.requires_grad_(flag)
        model.train(was_training)
    seconds = time.perf_counter() - began
    learned = {key: rotation.detach() for key, rotation in current.items()}
    worst = max((orthogonality_error(r) for r in learned.values()), default=0.0)
    logger.info(
        "learned {} rotation(s) in {} steps, {:.1f} s ({:.1f} s per 100 steps): loss {:.4f} "
        "-> {:.4f}, max |R^T R - I| = {:.1e}",
        len(learned),
        steps,
        seconds,
        100 * seconds / max(steps, 1),
        losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"),
        worst,
    )
    return LearnedRotations(learned, losses, seconds)


@torch.no_grad()
def fuse_rotations(
    plan: list[RotatedSide],
    rotations: Mapping[str, torch.Tensor],
    precision: torch.dtype = torch.float64,
) -> None:
    """Fuse the rotations into the weights, as fixed rotations are fused."""
    for side in tqdm(plan, desc="fusing learned rotations", leave=False):
        rotation = rotations[side.key]
        if side.side == "output":
            rotate_output(side.module, rotation, precision)
        else:
            rotate_input(side.module, rotation, precision)


def learn_and_fuse(
    model: torch.nn.Module,
    mapping: SpinQuantMapping,
    rotations: Iterable[str],
    sizes: Mapping[str, int],
    batches: Iterable[Any],
    quantizers: LoopQuantizers,
    *,
    transform_type: TransformType,
    randomize: bool,
    precision: torch.dtype,
    steps: int,
    lr: float,
    momentum: float,
    batch_rows: int | None = None,
    loss: LearnLoss | Literal["input_range"] = "cross_entropy",
    accumulate: int = 1,
) -> LearnedRotations:
    """Learn the rotations from the fixed ones on ``batches``, then fuse them into the model
    (whose norms must already be fused and embeddings untied). The parameters are those of
    ``rotation_plan``, ``initial_rotations``, ``learn_rotations`` and ``fuse_rotations``;
    ``loss`` ``input_range`` learns on the ranges of the rotated inputs instead
    (``input_ranges.learn_on_input_ranges``, activation quantizer only)."""
    plan = rotation_plan(model, mapping, rotations)
    start = initial_rotations(plan, transform_type, sizes, randomize=randomize)
    if loss == "input_range":
        if quantizers.activations is None or quantizers.activations.num_bits is None:
            raise ValueError("learn_loss input_range needs learn_activations")
        ranges = learn_on_input_ranges(
            model,
            plan,
            start,
            batches,
            quantized_linears(model),
            2 ** (quantizers.activations.num_bits - 1) - 1,
            steps=steps,
            lr=lr,
            momentum=momentum,
        )
        fuse_rotations(plan, ranges.rotations, precision)
        return LearnedRotations(ranges.rotations, ranges.losses, ranges.seconds)
    learned = learn_rotations(
        model,
        plan,
        start,
        batches,
        quantizers,
        steps=steps,
        lr=lr,
        momentum=momentum,
        batch_rows=batch_rows,
        loss=loss,
        accumulate=accumulate,
    )
    fuse_rotations(plan, learned.rotations, precision)
    return learned

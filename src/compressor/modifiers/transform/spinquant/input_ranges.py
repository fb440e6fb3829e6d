"""Rotations learned on the ranges of the inputs they turn (``learn_loss: input_range``).

With per-token dynamic activation quantization, each token's input ``z`` to a Linear is rounded
on a grid of step ``s = max_i |z_i| / q`` (``q = 2**(bits-1) - 1``, symmetric). Rounding noise
is then about uniform on ``[-s/2, s/2]`` per element, so the Linear's output carries noise of
power about ``||W||_F^2 s^2 / 12``, whatever the rotation of ``W`` (rotations keep Frobenius
norms). The rotations that turn a Linear's input (R1 for the residual stream's readers, R2 for
``o_proj``) change only ``s``: this objective is that noise summed over the quantized Linears
and averaged over calibration tokens, ``sum_sites ||W||_F^2 mean_t max_i |(x_t R)_i|^2 / q^2``.

Unlike the quantized model's cross-entropy (``learned.quantized_loss``), which is rough in the
rotations at 4 bits (a last-bit change flips roundings that reach every later layer;
bench/results/2026-12-02-spinquant-smollm2-learned.md), this objective has an exact gradient
almost everywhere (through each token's largest element) and needs no forward pass while
learning: the full-precision inputs of every rotated reader are collected once (the rotations
leave the full-precision model unchanged, so its inputs in the unrotated basis are those of any
rotation), then R1 and the R2s are trained on them by the same Cayley SGD.

Not the SpinQuant paper's objective (Liu et al. 2024, arXiv:2405.16406, learns on the quantized
model's cross-entropy); the same family as learning rotations to flatten activations
(e.g. DuQuant, KurTail). It sees only activation quantization: weights quantized afterwards
are not in it (``check_learning_arguments`` refuses it with ``learn_weights``).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger
from tqdm.auto import tqdm

from compressor.modifiers.transform.spinquant.cayley import cayley_sgd_step, orthogonality_error
from compressor.modifiers.transform.spinquant.learn_batches import on_device
from compressor.modifiers.transform.spinquant.rotated_model import RotatedSide, rotate_last

__all__ = [
    "TOKENS_PER_SITE",
    "TOKENS_PER_STEP",
    "ReaderInputs",
    "collect_reader_inputs",
    "input_range_loss",
    "learn_on_input_ranges",
]

TOKENS_PER_SITE = 4096
"""The calibration batches are read until this many tokens are in (the first ones; later
batches are not read), kept in bfloat16 for every rotated input: SmolLM2-135M's 90 inputs of
576 take 425 MB. The objective is a mean over tokens, so a few thousand estimate it well."""

TOKENS_PER_STEP = 512
"""Tokens of each input drawn (seeded) for one Cayley step's gradient."""


@dataclass
class ReaderInputs:
    """One input that a rotation turns, read by one or more quantized Linears.

    :param key: the rotation (``R1``, ``R2:<layer>``)
    :param names: the Linears that read it (q/k/v share one input, as gate/up do)
    :param weight: the sum of their weights' squared Frobenius norms: the noise's gain
    :param tokens: the full-precision inputs, unrotated, one row a token (bfloat16)
    """

    key: str
    names: list[str]
    weight: float
    tokens: torch.Tensor


@torch.no_grad()
def collect_reader_inputs(
    model: torch.nn.Module,
    plan: list[RotatedSide],
    linears: Mapping[str, torch.nn.Module],
    batches: Iterable[Any],
    *,
    max_tokens: int | None = None,
) -> list[ReaderInputs]:
    """The full-precision inputs of every input side of ``plan`` that a quantized Linear
    (``linears``) reads, over ``batches`` until ``max_tokens`` (default ``TOKENS_PER_SITE``)
    are in (padding left out).

    Linears handed the same tensor in a forward (q/k/v, gate/up) share one entry.

    :raises ValueError: when no rotated input is read by a quantized Linear, or no token came
    """
    max_tokens = TOKENS_PER_SITE if max_tokens is None else max_tokens
    names = {id(module): name for name, module in linears.items()}
    sides = [s for s in plan if s.side == "input" and id(s.module) in names]
    if not sides:
        raise ValueError(
            "learn_loss input_range: no quantized Linear of the decoder layers reads a rotated "
            "input; it needs R1 (q/k/v, gate/up) or R2 (o_proj) among the rotations"
        )
    device = next(model.parameters()).device
    entries: list[ReaderInputs] = []
    chunks: list[list[torch.Tensor]] = []
    by_module: dict[int, int] = {}
    mask: list[torch.Tensor | None] = [None]
    # id(input tensor) -> (entry, forward number, the tensor): a tensor's id is reused once
    # it is freed, so a match counts only while the same tensor is alive (weak reference)
    last: dict[int, tuple[int, int, weakref.ref[torch.Tensor]]] = {}
    forward = [0]

    def hook(module: torch.nn.Module, inputs: tuple[Any, ...], side: RotatedSide) -> None:
        x = inputs[0]
        seen = last.get(id(x))
        if seen is not None and (seen[2]() is not x or seen[1] != forward[0]):
            seen = None
        if id(module) not in by_module:
            if seen is not None:
                index = seen[0]
                entries[index].names.append(names[id(module)])
                entries[index].weight += float(module.weight.detach().double().pow(2).sum())
            else:
                index = len(entries)
                weight = float(module.weight.detach().double().pow(2).sum())
                entries.append(ReaderInputs(side.key, [names[id(module)]], weight, x.new_empty(0)))
                chunks.append([])
            by_module[id(module)] = index
        index = by_module[id(module)]
        last[id(x)] = (index, forward[0], weakref.ref(x))
        if seen is not None and seen[0] == index:
            return  # the entry's tokens of this forward are already taken
        rows = x.reshape(-1, x.shape[-1])
        if mask[0] is not None:
            rows = rows[mask[0].reshape(-1).bool()]
        chunks[index].append(rows.to("cpu", torch.bfloat16))

    handles = [s.module.register_forward_pre_hook(lambda m, i, s=s: hook(m, i, s)) for s in sides]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = on_device(batch, device)
            mask[0] = batch.get("attention_mask")
            model(**batch)
            forward[0] += 1
            last.clear()
            taken = sum(c.shape[0] for c in chunks[0]) if chunks else 0
            if taken >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for entry, pieces in zip(entries, chunks, strict=True):
        entry.tokens = torch.cat(pieces)[:max_tokens] if pieces else torch.empty(0)
    if not entries or any(e.tokens.shape[0] == 0 for e in entries):
        raise ValueError("learn_loss input_range: the calibration batches gave no tokens")
    return entries


def input_range_loss(
    inputs: list[ReaderInputs],
    rotations: Mapping[str, torch.Tensor],
    levels: int,
    rows: Mapping[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The expected output noise of per-token dynamic symmetric quantization with ``levels``
    positive levels, per token, summed over the inputs (weighted by their Linears' squared
    Frobenius norms, normalised to sum 1) and averaged over tokens (``rows``: which tokens of
    each input, by its position in ``inputs``; all when None)."""
    total = sum(entry.weight for entry in inputs)
    loss = torch.zeros((), dtype=torch.float64)
    for position, entry in enumerate(inputs):
        x = entry.tokens if rows is None else entry.tokens[rows[position]]
        dtype = torch.promote_types(x.dtype, torch.float32)  # float32 for bfloat16 storage
        z = rotate_last(x.to(dtype), rotations[entry.key].to(dtype))
        spread = z.abs().amax(-1).double().pow(2).mean()
        loss = loss + entry.weight / total * spread / (12 * levels**2)
    return loss


@dataclass
class RangeLearning:
    """What training on the input ranges produced (``learned.LearnedRotations``' fields)."""

    rotations: dict[str, torch.Tensor]
    losses: list[float]
    seconds: float
    start_loss: float
    end_loss: float


def _draws(inputs: list[ReaderInputs], seed: int) -> Iterator[dict[int, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield {
            i: torch.randint(0, e.tokens.shape[0], (min(TOKENS_PER_STEP, e.tokens.shape[0]),),
                             generator=generator)
            for i, e in enumerate(inputs)
        }  # fmt: skip


def learn_on_input_ranges(
    model: torch.nn.Module,
    plan: list[RotatedSide],
    rotations: Mapping[str, torch.Tensor],
    batches: Iterable[Any],
    linears: Mapping[str, torch.nn.Module],
    levels: int,
    *,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    seed: int = 0,
) -> RangeLearning:
    """Train the rotations by Cayley SGD on ``input_range_loss`` (see the module doc).

    :param rotations: the starting rotations (``learned.initial_rotations``)
    :param batches: the calibration batches, read once to collect the inputs (the first
        ``TOKENS_PER_SITE`` tokens)
    :param linears: the quantized Linears (``rotated_model.quantized_linears``)
    :param levels: the activation quantizer's positive levels, ``2**(bits-1) - 1``
    """
    began = time.perf_counter()
    inputs = collect_reader_inputs(model, plan, linears, batches)
    learned = {k for k in rotations if any(e.key == k for e in inputs)}
    current = {k: r.detach().to("cpu", torch.float64) for k, r in rotations.items()}
    buffers: dict[str, torch.Tensor | None] = dict.fromkeys(learned)
    with torch.no_grad():
        start_loss = float(input_range_loss(inputs, current, levels))
    losses: list[float] = []
    draws = _draws(inputs, seed)
    bar = tqdm(range(steps), desc="learning rotations (input ranges)")
    for step in bar:
        params = {k: current[k].clone().requires_grad_(True) for k in sorted(learned)}
        value = input_range_loss(inputs, {**current, **params}, levels, next(draws))
        # relative to the start, so that a learning rate means the same at any width and bits
        grads = torch.autograd.grad(value / start_loss, list(params.values()))
        rate = lr * (1 - step / steps)
        for key, grad in zip(params, grads, strict=True):
            current[key], buffers[key] = cayley_sgd_step(
                current[key], grad, buffers[key], rate, momentum
            )
        losses.append(value.item())
        bar.set_postfix(loss=f"{losses[-1]:.5f}")
    with torch.no_grad():
        end_loss = float(input_range_loss(inputs, current, levels))
    seconds = time.perf_counter() - began
    worst = max((orthogonality_error(current[k]) for k in learned), default=0.0)
    logger.info(
        "learned {} rotation(s) on the ranges of {} quantized input(s) ({} tokens each at most) "
        "in {} steps, {:.1f} s: expected noise {:.5f} -> {:.5f} ({:+.1%}), max |R^T R - I| = "
        "{:.1e}",
        len(learned),
        len(inputs),
        TOKENS_PER_SITE,
        steps,
        seconds,
        start_loss,
        end_loss,
        end_loss / start_loss - 1,
        worst,
    )
    device = next(model.parameters()).device
    return RangeLearning(
        {k: v.to(device) for k, v in current.items()}, losses, seconds, start_loss, end_loss
    )

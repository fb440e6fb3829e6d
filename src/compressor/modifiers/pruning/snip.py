"""The numbers of ``snip_momentum`` pruning: block scores, the exponential schedule and the
global block masks.

This is the pruner DeepSpeed runs for ``sparse_pruning`` with ``method: snip_momentum``
(DeepSpeed 0.19.6 hands the whole job to Intel Neural Compressor's PyTorch pruner with its
``snip_momentum`` criterion, an ``NxM`` pattern, ``global`` scope and ``exp`` decay; the rules
below are read from neural-compressor 3.7.1, the last release that has that pruner). The
score of a weight is the SNIP saliency |W * dL/dW| (Lee et al., "SNIP: Single-shot Network
Pruning based on Connection Sensitivity", 2019, arXiv:1810.02340), kept as a momentum over
optimizer steps and averaged over ``NxM`` blocks; at each pruning step one threshold over the
blocks of *every* layer removes the lowest-scored blocks, no layer past 98%.

Weights are viewed as 2-D ``(rows, columns)`` matrices: a Linear's ``(out, in)`` as it is, a
Conv2d's ``(out, in, kh, kw)`` as ``(out, kh * kw * in)`` (kernel positions, then channels).
Every function here is pure: tensors in, tensors out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = [
    "MAX_LAYER_SPARSITY",
    "SNIP_ALPHA",
    "SNIP_BETA",
    "BlockPattern",
    "PruneSchedule",
    "block_scores",
    "block_sparsity",
    "classifier_head",
    "expand_block_mask",
    "from_matrix",
    "global_block_masks",
    "momentum_update",
    "parse_block_pattern",
    "snip_layers",
    "to_matrix",
]

#: the momentum kept from the previous score, and the weight of the new saliency
SNIP_ALPHA = 0.9
SNIP_BETA = 1.0
#: no layer is pruned past this fraction of its blocks
MAX_LAYER_SPARSITY = 0.98

_PATTERN = re.compile(r"^(?:(\d+)|channel)x(?:(\d+)|channel)$")
BLOCK_PATTERN_FORMS = (
    "'NxM' with positive integers N and M (such as '4x1'), 'channelxM' or 'Nxchannel'"
)


@dataclass(frozen=True)
class BlockPattern:
    """The block a score covers: ``rows`` x ``cols`` of the 2-D weight; None spans the whole
    dimension (``channelx1``: a block is a whole column of one input)."""

    rows: int | None
    cols: int | None

    def shape_for(self, matrix_shape: tuple[int, int]) -> tuple[int, int]:
        """The block's size in a weight whose 2-D view is ``matrix_shape``."""
        return (
            matrix_shape[0] if self.rows is None else self.rows,
            matrix_shape[1] if self.cols is None else self.cols,
        )

    def check(self, matrix_shape: tuple[int, int], where: str) -> tuple[int, int]:
        """The block size, or a ValueError naming ``where`` when it does not tile the weight."""
        block = self.shape_for(matrix_shape)
        if matrix_shape[0] % block[0] or matrix_shape[1] % block[1]:
            raise ValueError(
                f"block_pattern {self}: {where} has a {matrix_shape[0]}x{matrix_shape[1]} "
                f"weight (rows = outputs), which {block[0]}x{block[1]} blocks do not tile; "
                "choose a pattern whose N divides the rows and M the columns, or leave the "
                "layer out (ignore, or DeepSpeed's excluded_modules)"
            )
        return block

    def __str__(self) -> str:
        rows = "channel" if self.rows is None else str(self.rows)
        cols = "channel" if self.cols is None else str(self.cols)
        return f"{rows}x{cols}"


def parse_block_pattern(value: str) -> BlockPattern:
    """``"4x1"`` -> 4 rows by 1 column; ``"channelx1"``, ``"1xchannel"``: a whole dimension.

    :raises ValueError: naming ``block_pattern`` and the forms allowed
    """
    if isinstance(value, str) and (":" in value or "mha" in value):
        raise ValueError(
            f"block_pattern must be {BLOCK_PATTERN_FORMS}; got {value!r}: DeepSpeed's pruner "
            "reads 'N:M' as N-of-M sparsity and 'mha' as head pruning, which snip_momentum "
            "does not implement here"
        )
    match = _PATTERN.match(value) if isinstance(value, str) else None
    if match is None or value == "channelxchannel":
        raise ValueError(f"block_pattern must be {BLOCK_PATTERN_FORMS}; got {value!r}")
    rows, cols = (int(g) if g is not None else None for g in match.groups())
    if rows == 0 or cols == 0:
        raise ValueError(f"block_pattern must be {BLOCK_PATTERN_FORMS}; got {value!r}")
    return BlockPattern(rows, cols)


def to_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-D view scores and masks are taken on: ``(out, in)``, a conv's ``(out, kh*kw*in)``."""
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() == 4:
        return tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
    raise ValueError(
        f"snip_momentum scores 2-D (Linear) or 4-D (Conv2d) weights, got {tuple(tensor.shape)}"
    )


def from_matrix(matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Undo ``to_matrix`` for a tensor of the weight's ``shape``."""
    if len(shape) == 2:
        return matrix
    out, cin, kh, kw = shape
    return matrix.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)


def block_scores(matrix: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The mean of ``matrix`` over each block: ``(rows / N, cols / M)``."""
    rows, cols = matrix.shape
    tiles = matrix.reshape(rows // block[0], block[0], cols // block[1], block[1])
    return tiles.mean(dim=-1).mean(dim=1)


def momentum_update(
    scores: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """The block scores after one optimizer step: ``SNIP_ALPHA * scores`` plus
    ``SNIP_BETA`` times the block mean of |W * grad| (taken in the weight's dtype, as the
    pruner does, and accumulated in float32).

    :param scores: float32 ``(rows / N, cols / M)``
    :param weight: the weight before the step, any supported shape
    :param grad: its gradient
    """
    saliency = block_scores(to_matrix((weight * grad).abs()), block)
    return scores * SNIP_ALPHA + SNIP_BETA * saliency.float()


def expand_block_mask(
    mask: torch.Tensor, block: tuple[int, int], shape: torch.Size
) -> torch.Tensor:
    """A per-block mask broadcast to a weight of ``shape``."""
    matrix = mask.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return from_matrix(matrix, shape)


def block_sparsity(masks: list[torch.Tensor]) -> float:
    """The fraction of pruned blocks over all ``masks`` (0 when there are none)."""
    total = sum(m.numel() for m in masks)
    pruned = sum(int((~m).sum()) for m in masks)
    return pruned / total if total else 0.0


@dataclass(frozen=True)
class PruneSchedule:
    """When masks are recomputed and how sparse they become: from ``start`` to ``end``
    (optimizer steps, inclusive) every ``stride`` steps, the sparsity rising as
    ``1 - (1 - target) ** (done / total)`` where ``done`` counts the pruning steps taken (0 at
    ``start``, so the first one prunes nothing) and ``total`` the steps after the first.

    When ``start == end`` the target is reached at ``start`` in one step; when ``end`` comes
    before the second pruning step, the first one already reaches it.
    """

    start: int
    end: int
    stride: int
    target: float

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"stride must be at least 1, got {self.stride}")
        if not self.start <= self.end:
            raise ValueError(f"end ({self.end}) must not come before start ({self.start})")
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {self.target}")

    @property
    def total(self) -> int:
        """How many pruning steps follow the first (at least 1)."""
        return max(1, (self.end - self.start + self.stride) // self.stride - 1)

    @property
    def first_done(self) -> int:
        """The ``done`` count at the first pruning step: 0, or 1 when it must reach the target."""
        return 1 if (self.end - self.start + self.stride) // self.stride - 1 == 0 else 0

    def is_pruning_step(self, step: int) -> bool:
        return self.start <= step <= self.end and (step - self.start) % self.stride == 0

    def sparsity(self, done: int) -> float:
        """The model-wide block sparsity the ``done``-th pruning step aims at."""
        if self.start == self.end:
            return self.target
        aimed = min(MAX_LAYER_SPARSITY, self.target)
        dense_per_step = (1.0 - aimed) ** (1.0 / self.total)
        return min(self.target, 1.0 - dense_per_step**done)


def _prune_below(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the blocks above the ``int(sparsity * n)``-th lowest score (ties are pruned)."""
    flat = scores.reshape(-1)
    k = int(sparsity * flat.numel())
    if k < 1:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat, k).values
    return scores > threshold


def _capped_sparsity(
    masks: list[torch.Tensor], index: int, pruned: int, total: int, final_target: float
) -> tuple[bool, float]:
    """Whether layer ``index`` (``pruned`` of ``total`` blocks below the threshold) must be
    pruned to a fixed fraction instead, and that fraction: at most ``MAX_LAYER_SPARSITY``,
    and, once some layer is past ``final_target``, no more than keeps the model-wide count
    of pruned blocks within ``final_target`` (``masks``: the other layers as they stand)."""
    capped = False
    ratio = pruned / total
    if ratio > MAX_LAYER_SPARSITY:
        capped, ratio, pruned = True, MAX_LAYER_SPARSITY, int(total * MAX_LAYER_SPARSITY)
    others = [(int((~m).sum()), m.numel()) for i, m in enumerate(masks) if i != index]
    any_past = ratio > final_target or any(p / n > final_target for p, n in others)
    own = masks[index]
    any_past = any_past or int((~own).sum()) / own.numel() > final_target
    if not any_past:
        return capped, ratio
    all_blocks = sum(n for _, n in others) + total
    room = int(all_blocks * final_target) - sum(p for p, _ in others) - pruned
    if room >= 0:
        return capped, ratio
    return True, (pruned + room) / total


def global_block_masks(
    scores: list[torch.Tensor],
    masks: list[torch.Tensor],
    sparsity: float,
    final_target: float,
) -> list[torch.Tensor]:
    """The block masks (True: kept) of every layer at model-wide ``sparsity``.

    One threshold over the blocks of all layers prunes ``int(sparsity * all blocks)`` of them
    (a block scoring at or below it is pruned). A layer the threshold would prune past
    ``MAX_LAYER_SPARSITY`` is pruned to exactly that fraction by its own threshold, and the
    threshold is taken again over the other layers for the blocks still to prune, until no
    layer is capped. Layers are visited in order, each compared with the others' masks as
    they stand (already updated, or still the previous ones). Masks follow the scores alone:
    a block pruned before comes back when its (decaying) score rises above the threshold.

    :param scores: per layer, the ``(rows / N, cols / M)`` block scores
    :param masks: per layer, the current boolean block masks
    :param sparsity: the fraction of all blocks to prune now
    :param final_target: the schedule's final sparsity, which no layer past it may push the
        model-wide count beyond
    """
    out = list(masks)
    total = sum(m.numel() for m in out)
    to_prune = int(total * sparsity)
    if to_prune <= 0:
        return out
    capped = [False] * len(scores)
    active: list[int] | None = None
    while True:
        now = [i for i in range(len(scores)) if not capped[i]]
        if now == active or not now:
            break
        active = now
        if to_prune < 1:
            break
        pool = torch.cat([scores[i].reshape(-1) for i in active])
        threshold = torch.kthvalue(pool, to_prune).values
        for i in active:
            mask = scores[i] > threshold
            adjust, ratio = _capped_sparsity(out, i, int((~mask).sum()), mask.numel(), final_target)
            if adjust:
                capped[i] = True
                out[i] = _prune_below(scores[i], ratio)
                to_prune -= int((~out[i]).sum())
            else:
                out[i] = mask
    return out


def classifier_head(model: torch.nn.Module) -> str | None:
    """The name of ``model``'s last module when it is a plain ``Linear`` or ``Conv2d`` (a
    classifier or LM head), dropout modules aside; None otherwise. DeepSpeed's pruner leaves
    that module out."""
    last = None
    for name, module in model.named_modules():
        if type(module).__name__ != "Dropout":
            last = (name, module)
    if last is None or type(last[1]).__name__ not in ("Linear", "Conv2d"):
        return None
    return last[0]


def snip_layers(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module]], str | None]:
    """The modules DeepSpeed's ``snip_momentum`` prunes when no module is named: each whose
    class name contains ``Linear`` or ``Conv`` and that has a ``weight``, less the
    ``classifier_head`` (and every module whose name that head's name finds, as a regular
    expression, as DeepSpeed excludes it). Returns them and the head's name."""
    head = classifier_head(model)
    found = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if ("Linear" in kind or "Conv" in kind) and hasattr(module, "weight"):
            if head is not None and re.search(head, name):
                continue
            found.append((name, module))
    return found, head

"""The ``snip_momentum`` scorer: block SNIP scores with momentum, pruned globally on an
exponential schedule, as DeepSpeed's ``sparse_pruning`` ``method: snip_momentum`` does
(the numbers, and where they come from: ``snip.py``)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from loguru import logger

from compressor.core import Event
from compressor.modifiers.pruning.coupling import Coupling, latent_weight
from compressor.modifiers.pruning.scorers import Scorer, ScorerHost
from compressor.modifiers.pruning.snip import (
    BlockPattern,
    PruneSchedule,
    block_sparsity,
    expand_block_mask,
    global_block_masks,
    momentum_update,
    parse_block_pattern,
    to_matrix,
)

__all__ = ["SnipMomentumHost", "SnipMomentumScorer"]


class SnipMomentumHost(ScorerHost, Protocol):
    """The fields of the modifier the ``snip_momentum`` scorer reads."""

    block_pattern: str | None
    start: float | None
    end: float | None
    update: float | None


class SnipMomentumScorer(Scorer):
    """``snip_momentum``: per block, a momentum of |W * grad| over the optimizer steps; at
    each pruning step one threshold over the blocks of all couplings.

    - ``prepare``: a zero score and a kept mask per block of every coupling (a
      ValueError names a layer the block pattern does not tile)
    - ``before_optimizer_step`` (every optimizer step, from the first, whatever ``start``):
      the scores take the step's gradients, after clipping
    - ``at_step`` (each BATCH_START from ``start``): on a pruning step of the schedule
      (``start``, ``start + update``, ... up to ``end``, once per optimizer step), the masks
      at the schedule's sparsity are held on the weights
    - ``end`` (at finalize): the masks stay as the last pruning step left them; a run that
      stops before ``end`` keeps the sparsity it reached, which is logged

    Gradients of pruned weights are not masked (the optimizer moves them and the holder
    zeroes them after every step), so gradient clipping and optimizer state see what they
    see under DeepSpeed.
    """

    own_schedule = True
    masks_gradients = False

    def __init__(self, modifier: SnipMomentumHost, couplings: list[Coupling]) -> None:
        super().__init__(modifier, couplings)
        self.pattern: BlockPattern = parse_block_pattern(modifier.block_pattern or "4x1")
        final = modifier.final_density()
        assert final is not None and modifier.start is not None
        start = int(modifier.start)
        end = int(modifier.end) if modifier.end is not None else start
        self.schedule = PruneSchedule(start, end, int(modifier.update or 1), 1.0 - final)
        self.blocks: list[tuple[int, int]] = []
        self.block_scores: list[torch.Tensor] = []
        self.block_masks: list[torch.Tensor] = []
        self.done = self.schedule.first_done
        self.steps_seen = 0
        self._handled_step = -1

    def _weights(self) -> list[tuple[str, Any]]:
        # the Parameter itself: under quantization-aware training ``module.weight`` is a fresh
        # fake-quantized tensor on every read, with no gradient of its own
        return [(c.name, latent_weight(c.members[0].module)) for c in self.couplings]

    def prepare(self, optimizer: Any) -> None:
        for coupling in self.couplings:
            if coupling.structured or len(coupling.members) != 1:
                raise ValueError(
                    f"{type(self.modifier).__name__}: method 'snip_momentum' prunes single "
                    f"layers; {coupling.name} is a structured coupling"
                )
        for name, weight in self._weights():
            if weight.dim() not in (2, 4):
                raise ValueError(f"snip_momentum: {name} has a {weight.dim()}-D weight")
            rows, cols = to_matrix(weight).shape
            block = self.pattern.check((rows, cols), name)
            self.blocks.append(block)
            shape = (rows // block[0], cols // block[1])
            self.block_scores.append(torch.zeros(shape, dtype=torch.float32, device=weight.device))
            self.block_masks.append(torch.ones(shape, dtype=torch.bool, device=weight.device))

    def before_optimizer_step(self) -> None:
        with torch.no_grad():
            for i, (name, weight) in enumerate(self._weights()):
                if weight.grad is None:
                    raise RuntimeError(
                        f"{type(self.modifier).__name__}: method 'snip_momentum' scores by "
                        f"gradients, and {name} has none at this optimizer step (frozen, or "
                        "not used in the forward); leave it out with ignore"
                    )
                self.block_scores[i] = momentum_update(
                    self.block_scores[i], weight.detach(), weight.grad, self.blocks[i]
                )
        self.steps_seen += 1

    def at_step(self, event: Event) -> None:
        """Prune when ``event`` (a BATCH_START) is the first of a scheduled pruning step."""
        if event.epoch_based:
            raise ValueError(
                f"{type(self.modifier).__name__}: method 'snip_momentum' counts its schedule "
                "in optimizer steps; run it with step offsets, not epochs"
            )
        step = event.global_step
        if step == self._handled_step:
            return
        self._handled_step = step
        if not self.schedule.is_pruning_step(step):
            return
        if block_sparsity(self.block_masks) > self.schedule.target:
            return
        sparsity = self.schedule.sparsity(self.done)
        self.done += 1
        total = sum(m.numel() for m in self.block_masks)
        if self.steps_seen == 0 and int(total * sparsity) > 0:
            raise RuntimeError(
                f"{type(self.modifier).__name__}: method 'snip_momentum' has seen no optimizer "
                f"step by its pruning step {step}, so it has no scores; it needs the optimizer "
                "the session watches (or optim_pre_step events)"
            )
        self.block_masks = global_block_masks(
            self.block_scores, self.block_masks, sparsity, self.schedule.target
        )
        self._hold()
        logger.info(
            "{}: snip_momentum at step {}: {:.4f} of the blocks pruned (aiming at {:.4f})",
            type(self.modifier).__name__,
            step,
            block_sparsity(self.block_masks),
            sparsity,
        )

    def _hold(self) -> None:
        for index, (_, weight) in enumerate(self._weights()):
            full = expand_block_mask(self.block_masks[index], self.blocks[index], weight.shape)
            self.modifier.hold_mask(index, full)
        self.density = 1.0 - block_sparsity(self.block_masks)

    def start(self, density: float) -> None:
        """Nothing: the masks come at the schedule's pruning steps (``at_step``)."""

    def step(self, density: float) -> None:
        """Nothing: the masks come at the schedule's pruning steps (``at_step``)."""

    def apply(self, density: float) -> None:
        raise RuntimeError("snip_momentum chooses its masks at its own pruning steps")

    def end(self, density: float) -> None:
        reached = block_sparsity(self.block_masks)
        if self._handled_step < self.schedule.end:
            logger.warning(
                "{}: training stopped at step {}, before snip_momentum's last pruning step "
                "{}: {:.4f} of the blocks are pruned, not the target {:.4f}",
                type(self.modifier).__name__,
                max(self._handled_step, 0),
                self.schedule.end,
                reached,
                self.schedule.target,
            )
        else:
            logger.info(
                "{}: snip_momentum ends with {:.4f} of the blocks pruned",
                type(self.modifier).__name__,
                reached,
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "scores": {},
            "keep": {},
            "snip_momentum": {
                "block_scores": {str(i): s.clone() for i, s in enumerate(self.block_scores)},
                "block_masks": {str(i): m.clone() for i, m in enumerate(self.block_masks)},
                "done": self.done,
                "steps_seen": self.steps_seen,
                "handled_step": self._handled_step,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("snip_momentum")
        if saved is None:
            raise ValueError(
                f"{type(self.modifier).__name__}: the checkpoint has no snip_momentum scores; "
                "resume with the recipe it was saved with"
            )
        for key, value in saved["block_scores"].items():
            index = int(key)
            if value.shape != self.block_scores[index].shape:
                raise ValueError(
                    f"snip_momentum: {self.couplings[index].name} has block scores of shape "
                    f"{tuple(self.block_scores[index].shape)}, the checkpoint {tuple(value.shape)}"
                )
            self.block_scores[index] = value.to(self.block_scores[index].device)
        for key, value in saved["block_masks"].items():
            index = int(key)
            self.block_masks[index] = value.to(self.block_masks[index].device)
        self.done = int(saved["done"])
        self.steps_seen = int(saved["steps_seen"])
        self._handled_step = int(saved["handled_step"])

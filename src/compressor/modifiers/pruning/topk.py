"""The ``topk`` scorer: learnable scores that train with the model (Sanh et al., "Movement
Pruning", 2020, arXiv:2005.07683)."""

from __future__ import annotations

from typing import Any

import torch
from loguru import logger

from compressor.modifiers.pruning.coupling import Coupling, Member, member_tensors
from compressor.modifiers.pruning.masks import ScoreMask, add_score_mask
from compressor.modifiers.pruning.schedule import kept_count
from compressor.modifiers.pruning.scorers import Scorer, ScorerHost
from compressor.modifiers.pruning.scores import magnitude_scores

__all__ = ["TopKScorer"]


class TopKScorer(Scorer):
    """``topk``: a learnable score per weight (per unit for a structured coupling), shared by
    every tensor of the coupling. Each masked tensor is parametrized as ``weight *
    binarize(scores)``: the top-k scores kept, through a straight-through estimator so that
    the scores receive gradients (``masks.ScoreMask``).

    - ``prepare``: the scores start as the l1 magnitudes (so the first mask is the l1 mask)
      and join the optimizer the session was given (an optimizer created after initialize
      finds them in ``model.parameters()``)
    - ``start`` / ``step``: set how many scores each mask keeps
    - ``end``: the learned masks become fixed masks held on the weights; the parametrizations
      and scores are released
    """

    def __init__(self, modifier: ScorerHost, couplings: list[Coupling]) -> None:
        super().__init__(modifier, couplings)
        #: by coupling index, the parametrizations sharing its scores (one per masked tensor)
        self.score_masks: dict[int, list[ScoreMask]] = {}
        self._handles: list[Any] = []

    def weight_scores(self, member: Member) -> torch.Tensor:
        return magnitude_scores(member.module.weight)

    def prepare(self, optimizer: Any) -> None:
        created = []
        for index, coupling in enumerate(self.couplings):
            init = self.scores(coupling)
            device = coupling.members[0].module.weight.device
            scores = torch.nn.Parameter(init.to(device))
            created.append(scores)
            masks = []
            for member in coupling.members:
                for name, param in member_tensors(member):
                    dim = member.dim if (member.dim is None or param.dim() > 1) else 0
                    score_mask = self.modifier.score_mask_for(coupling, scores, dim)
                    handle = add_score_mask(member.module, name, score_mask, member.name)
                    self._handles.append(self.modifier.track_handle(handle))
                    masks.append(score_mask)
            self.score_masks[index] = masks
        if optimizer is not None:
            known = {id(p) for g in optimizer.param_groups for p in g["params"]}
            new = [s for s in created if id(s) not in known]
            if new:
                optimizer.add_param_group({"params": new})
                logger.info(
                    "{}: added {} learnable score tensor(s) to the optimizer",
                    type(self.modifier).__name__,
                    len(new),
                )

    def apply(self, density: float) -> None:
        for masks in self.score_masks.values():
            keep = kept_count(masks[0].scores.numel(), density)  # entries, or units
            for score_mask in masks:
                score_mask.keep = keep
        self.density = density
        self._log_density(density)

    def end(self, density: float) -> None:
        self.apply(density)
        learned = {i: masks[0].binary().detach().bool() for i, masks in self.score_masks.items()}
        self.release()
        for index, mask in learned.items():
            self.modifier.hold_mask(index, mask)

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.score_masks.clear()

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {
            "scores": {str(i): m[0].scores.detach().clone() for i, m in self.score_masks.items()},
            "keep": {str(i): m[0].keep for i, m in self.score_masks.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy the checkpoint's scores into the Parameters this run created, which the
        optimizer already holds, so a checkpoint's optimizer state loaded afterwards applies
        to them."""
        if not self.score_masks:  # released: the scores live on as held masks
            super().load_state_dict(state_dict)
            return
        for key, value in state_dict.get("scores", {}).items():
            score_masks = self.score_masks[int(key)]
            target = score_masks[0].scores
            if value.shape != target.shape:
                raise ValueError(
                    f"{type(self.modifier).__name__}: coupling {self.couplings[int(key)].name} "
                    f"has scores of shape {tuple(target.shape)}, the checkpoint "
                    f"{tuple(value.shape)}"
                )
            with torch.no_grad():
                target.copy_(value)
            for score_mask in score_masks:
                score_mask.keep = int(state_dict["keep"][key])

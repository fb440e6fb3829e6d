"""ExpertPruningModifier: whole experts of mixture-of-experts blocks, chosen by REAP."""

from __future__ import annotations

from typing import Any

import torch
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator

from compressor.architectures.moe import MoEBlock, find_moe_blocks
from compressor.core.events import Event
from compressor.core.state import State
from compressor.modifiers.base import CalibrationTraits, Modifier
from compressor.modifiers.pruning.experts import (
    ExpertSaliency,
    check_prunable,
    experts_to_keep,
    remove_experts,
)

__all__ = ["ExpertPruningModifier"]


@Modifier.register("ExpertPruning")
class ExpertPruningModifier(Modifier):
    """Removes whole routed experts from every sparse mixture-of-experts block, choosing
    them by REAP saliency (Router-weighted Expert Activation Pruning; Lasby et al. 2025,
    "REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression"): over the
    calibration data, an expert's score is the mean, over
    the tokens routed to it, of its router gate weight times the norm of its output. The
    ``num_experts_to_prune`` experts of least score in each block are removed physically:
    the fused expert tensors, the router's rows (and any router bias or score-correction
    bias) shrink, and the config's number of experts is updated, so the saved model reloads
    with ``from_pretrained`` and routes among fewer experts. Top-k stays as it is; pruning
    so many that fewer than top-k experts remain is refused.

    Every block prunes the same number of experts, because transformers reads one expert
    count for all layers from the config; which experts go is decided per block.

    **Lifecycle**:

    - initialize: find the sparse blocks, refuse what cannot be pruned (too many experts
      for top-k, group-limited routing, experts already unfolded)
    - calibration start: a forward pre-hook on each experts module adds, for every routed
      (token, expert) pair, gate weight x output norm to that expert's sum
    - calibration end: per block, the experts of least mean score are removed; the kept
      experts and their token counts are logged; the config is updated

    .. code-block:: yaml

        prune_stage:
          pruning_modifiers:
            ExpertPruningModifier:
              num_experts_to_prune: 2

    :param num_experts_to_prune: experts removed from every sparse block
    """

    num_experts_to_prune: int = Field(ge=1)

    _blocks: list[MoEBlock] = PrivateAttr(default_factory=list)
    _saliency: dict[str, ExpertSaliency] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _one_shot_only(self) -> ExpertPruningModifier:
        for name in ("start", "end", "update"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}: ExpertPruningModifier runs only in "
                    "post-training calibration (oneshot); leave start, end and update unset"
                )
        return self

    def requires_calibration_data(self) -> bool:
        return True

    def calibration_traits(self) -> CalibrationTraits:
        return CalibrationTraits(
            reads_outputs=False,  # a forward pre-hook; the expert outputs are computed in it
            merges_batches=True,  # sums over tokens
        )

    def on_initialize(self, state: State) -> None:
        if state.model is None:
            raise ValueError("ExpertPruningModifier needs a model in the state")
        model = state.model
        self._blocks = find_moe_blocks(model)
        if not self._blocks:
            raise ValueError(
                "ExpertPruningModifier: the model has no sparse mixture-of-experts block of a "
                "known family (see compressor.architectures.moe.MOE_LAYOUTS)"
            )
        for block in self._blocks:
            check_prunable(
                block,
                model.get_submodule(block.experts),
                model.get_submodule(block.router),
                self.num_experts_to_prune,
            )
        logger.info(
            "ExpertPruningModifier will remove {} expert(s) from each of {} sparse block(s)",
            self.num_experts_to_prune,
            len(self._blocks),
        )

    def on_start(self, state: State, event: Event) -> None:
        assert state.model is not None
        for block in self._blocks:
            experts = state.model.get_submodule(block.experts)
            saliency = ExpertSaliency(block.num_experts)
            self._saliency[block.name] = saliency
            self.register_hook(experts, self._hook(saliency), "forward_pre")

    @staticmethod
    def _hook(saliency: ExpertSaliency) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            hidden, index, weights = args[:3]
            saliency.add(module, hidden, index, weights)

        return hook

    def on_end(self, state: State, event: Event) -> None:
        assert state.model is not None
        self.remove_hooks()
        model = state.model
        kept_count = 0
        for block in self._blocks:
            saliency = self._saliency.get(block.name)
            if saliency is None or int(saliency.tokens.sum()) == 0:
                raise RuntimeError(
                    f"ExpertPruningModifier: no calibration token reached {block.experts}; "
                    "the experts to remove cannot be chosen"
                )
            keep = experts_to_keep(saliency.scores(), self.num_experts_to_prune)
            removed = sorted(set(range(block.num_experts)) - set(keep.tolist()))
            remove_experts(
                model.get_submodule(block.experts),
                model.get_submodule(block.router),
                keep,
                block.num_experts,
            )
            kept_count = int(keep.numel())
            logger.info(
                "{}: removed experts {} (REAP scores {}; routed tokens {})",
                block.name,
                removed,
                [round(float(s), 4) for s in saliency.scores()[removed]],
                saliency.tokens[removed].tolist(),
            )
        config = getattr(model, "config", None)
        if config is not None:
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            setattr(text, self._blocks[0].layout.num_experts_key, kept_count)

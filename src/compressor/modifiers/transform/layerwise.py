"""``LayerSmoothingModifier``: what SmoothQuant and AWQ share around their scales: the
mappings (given, or the architecture's), statistics gathered per mapping by hooks, and scales
folded at the SEQUENTIAL_EPOCH_END of the layer that holds them."""

from __future__ import annotations

from typing import ClassVar

import torch
from loguru import logger
from pydantic import PrivateAttr, model_validator

from compressor.architectures import Feature, SmoothingMapping
from compressor.core.events import Event, EventType
from compressor.core.state import State
from compressor.modifiers.base import CalibrationTraits, Modifier
from compressor.modifiers.moe import (
    ExpertCalibrationFields,
    ExpertCoverage,
    LinearExperts,
    prepare_experts,
)
from compressor.modifiers.transform.smoothing import (
    ResolvedSmoothing,
    infer_smoothing_mappings,
    refresh_weight_qparams,
    resolve_smoothing_mappings,
)
from compressor.utils import distributed

__all__ = ["LayerSmoothingModifier"]


class LayerSmoothingModifier(ExpertCalibrationFields, Modifier):
    """Base of the modifiers that fold per-channel scales into a smooth layer and its balance
    layers (``SmoothingMapping``), one decoder layer at a time.

    **Lifecycle**

    - ``on_initialize``: the mappings (given, or the architecture's: an error names a model
      without them); the fused experts of a mixture-of-experts model unfolded into one Linear
      per expert (as the quantizers after it do); the mappings resolved: one that matches
      nothing, or (given) does not fit the shapes, is an error
    - ``on_start`` (calibration start): the subclass's hooks gather each mapping's statistics;
      when some are gathered inside routed experts, every token also runs through every
      expert (``calibrate_all_experts``) and the tokens each expert saw are counted
    - ``on_update`` at SEQUENTIAL_EPOCH_END: the mappings inside the event's modules that
      have statistics get their scales (the subclass's ``_scales``) folded into the weights
    - ``on_end`` (calibration end): hooks removed; a mapping never reached is an error
    - ``finalize``: nothing left; the weights are an ordinary checkpoint

    Under a process group (each rank calibrating on its share of the rows), a mapping is
    smoothed when any rank has statistics for it, from the statistics reduced over the ranks
    (the subclass's ``_scales``: SmoothQuant's channel extremes, AWQ's mean magnitudes and the
    squared errors of its grid search).

    The pipelines run these modifiers' calibration before the others'
    (``CalibrationTraits.transforms_first``), so quantizers calibrate the smoothed layer.

    Mixture-of-experts models: a mapping whose balance layers read a sparse block's input
    must balance every expert's and shared expert's gate and up projection, and the block's
    router (and shared-expert gate) gets the scales folded into its weight too, so routing
    stays exact (``moe_smoothing.BlockReaders``).

    :param mappings: the smooth layer and balance layers of each mapping; the architecture's
        when unset (Llama, Mistral, Qwen2/3, Gemma, Phi-3, Mixtral, Qwen2/3-MoE, OLMoE,
        DeepSeek-V3)
    :param calibrate_all_experts: see ExpertCalibrationFields: statistics gathered inside
        routed experts (AWQ's up -> down of each expert) come from every token
    :param min_expert_tokens: see ExpertCalibrationFields
    :param moe_mappings: see ExpertCalibrationFields
    """

    mappings: list[SmoothingMapping] | None = None

    _feature: ClassVar[Feature] = "smoothquant"
    _resolved: list[ResolvedSmoothing] = PrivateAttr(default_factory=list)
    _norm_offset: float = PrivateAttr(default=0.0)
    _done: set[str] = PrivateAttr(default_factory=set)
    _coverage: ExpertCoverage | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _post_training_only(self) -> LayerSmoothingModifier:
        for field in ("start", "end", "update"):
            if getattr(self, field) is not None:
                raise ValueError(
                    f"{field}={getattr(self, field)!r}: {type(self).__name__} runs only in "
                    "post-training calibration (oneshot); leave start, end and update unset"
                )
        return self

    # ---------------------------------------------------------------- what subclasses give
    def _ignored(self) -> list[str]:
        """Smooth layers not to smooth."""
        return []

    def _experts_ignore(self) -> list[str]:
        """Modules whose experts stay fused (the quantizer's ignore, when this modifier has
        one)."""
        return []

    def _statistics_modules(self, resolved: ResolvedSmoothing) -> list[torch.nn.Module]:
        """The modules whose inputs or outputs ``_observe`` gathers statistics from."""
        return [resolved.smooth]

    def _observe(self, resolved: ResolvedSmoothing) -> None:
        """Register the hooks that gather ``resolved``'s statistics."""
        raise NotImplementedError

    def _has_statistics(self, resolved: ResolvedSmoothing) -> bool:
        raise NotImplementedError

    def _scales(self, resolved: ResolvedSmoothing) -> torch.Tensor | None:
        """The scales to fold (None: leave this mapping as it is, said in a log line); the
        statistics of ``resolved`` are released. Under a process group, from the statistics
        reduced over every rank (this rank may hold none: some other rank does)."""
        raise NotImplementedError

    def _fold(self, resolved: ResolvedSmoothing, scales: torch.Tensor) -> None:
        from compressor.modifiers.transform.smoothing import fold_smoothing_scales

        fold_smoothing_scales(
            resolved.smooth, [*resolved.balances, *resolved.routing], scales, self._norm_offset
        )

    # ---------------------------------------------------------------- lifecycle
    def requires_calibration_data(self) -> bool:
        return True

    def calibration_traits(self) -> CalibrationTraits:
        return CalibrationTraits(
            # weights written with update_offload_parameter
            supports_offloaded_models=True,
            # maxima, means over tokens and sums of squared errors: batching does not matter
            merges_batches=True,
            transforms_first=True,
            # the statistics are reduced over the ranks in ``_scales`` (subclasses)
            reduces_across_ranks=True,
        )

    def on_initialize(self, state: State) -> None:
        model = state.model
        if model is None:
            raise ValueError(f"{type(self).__name__} needs a model in the state")
        owner = type(self).__name__
        if self.mappings is None:
            mappings, self._norm_offset = infer_smoothing_mappings(model, self._feature, owner)
        else:
            mappings = list(self.mappings)
        # the mappings name experts as Linears: unfolded before they are matched
        prepare_experts(model, self._experts_ignore(), owner, tuple(self.moe_mappings))
        self._resolved = resolve_smoothing_mappings(
            model, mappings, self._ignored(), owner, inferred=self.mappings is None
        )
        logger.info("{} will smooth {} mapping(s)", owner, len(self._resolved))

    def on_start(self, state: State, event: Event) -> None:
        assert state.model is not None
        if self._gathers_inside_experts(state.model):
            self._coverage = ExpertCoverage.started_for(self, state.model)
        for resolved in self._resolved:
            self._observe(resolved)

    def _gathers_inside_experts(self, model: torch.nn.Module) -> bool:
        inside = {
            id(m) for e in model.modules() if isinstance(e, LinearExperts) for m in e.modules()
        }
        return any(id(m) in inside for r in self._resolved for m in self._statistics_modules(r))

    def on_update(self, state: State, event: Event) -> None:
        if event.type_ != EventType.SEQUENTIAL_EPOCH_END:
            return
        inside = {id(m) for part in event.modules for m in part.modules()}
        for resolved in self._resolved:
            if id(resolved.smooth) in inside:
                self._smooth_if_observed(resolved)

    def on_end(self, state: State, event: Event) -> None:
        if self._coverage is not None:
            self._coverage.end()
            self._coverage = None
        self.remove_hooks()
        for resolved in self._resolved:
            self._smooth_if_observed(resolved)
        unseen = [r.smooth_name for r in self._resolved if r.smooth_name not in self._done]
        if unseen:
            raise RuntimeError(
                f"{type(self).__name__}: no calibration data reached {', '.join(unseen)}, so "
                "their scales are unknown; give calibration data (pipeline sequential or basic)"
            )

    def on_finalize(self, state: State) -> None:
        if not self.started:
            raise RuntimeError(
                f"{type(self).__name__} computes its scales from calibration data, but no "
                "calibration ran; give calibration data to oneshot"
            )

    def _smooth_if_observed(self, resolved: ResolvedSmoothing) -> None:
        if resolved.smooth_name in self._done:
            return
        # under a process group, statistics on any rank: every rank then reduces them
        # (``_scales``), reached alike since the mappings come from the model
        device = resolved.balances[0].weight.device
        if not distributed.any_rank(self._has_statistics(resolved), device):
            return
        scales = self._scales(resolved)
        self._done.add(resolved.smooth_name)
        if scales is None:
            return
        self._fold(resolved, scales)
        refresh_weight_qparams(resolved)

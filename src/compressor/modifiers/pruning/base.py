"""The part every pruning modifier shares: fields, schedule and holding the masks; the
``method`` is a scorer (``scorers.py``, ``topk.py``)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator

from compressor.core import Event, EventType, State
from compressor.modifiers.base import CalibrationTraits, Modifier
from compressor.modifiers.pruning.coupling import Coupling, latent_weight, member_tensors
from compressor.modifiers.pruning.masks import MaskHolder, ScoreMask, expand_unit_mask
from compressor.modifiers.pruning.schedule import Ramp, density_at, kept_count
from compressor.modifiers.pruning.scorers import ActivationScorer, L1Scorer, Scorer
from compressor.modifiers.pruning.scores import topk_mask
from compressor.modifiers.pruning.snip_momentum import SnipMomentumScorer
from compressor.modifiers.pruning.topk import TopKScorer
from compressor.utils.finite import check_finite_weights
from compressor.utils.patterns import MatchPattern
from compressor.utils.sharding import is_sharded

__all__ = ["SCORERS", "PruningMethod", "PruningModifierBase"]

PruningMethod = Literal["l1", "topk", "activation", "snip_momentum"]

#: ``method`` -> the scorer that implements it
SCORERS: dict[str, type[Scorer]] = {
    "l1": L1Scorer,
    "topk": TopKScorer,
    "activation": ActivationScorer,
    "snip_momentum": SnipMomentumScorer,
}


class PruningModifierBase(Modifier):
    """Shared fields and lifecycle of the pruning modifiers (not registered itself).

    The modifier resolves the couplings, follows the density schedule and holds the masks on
    the weights; its ``method`` is a scorer (``SCORERS``), called at every step below.

    **Lifecycle**

    - ``on_initialize``: resolve the couplings (targets and coupled modules); ``topk``
      creates the learnable scores, parametrizes the weights with them and adds the scores to
      the optimizer the session was given (an optimizer created after ``initialize`` finds
      them in ``model.parameters()``)
    - ``on_start``: compute the first masks (``activation``: start recording input norms)
    - ``on_update``: on BATCH_START, when ``update`` says so, recompute the masks at the
      scheduled density (``activation``: when a sequential pipeline has calibrated a layer,
      choose the masks inside it)
    - ``on_event``: before every optimizer step, the scorer sees the final gradients
      (``snip_momentum`` scores them); after every optimizer step and at BATCH_END, zero the
      pruned weights again (until finalize, also after ``end``)
    - ``on_end``: masks at the final density, then frozen (``topk`` scores become fixed masks);
      ``activation``: under DDP the input norms are summed over every rank before the masks
      are chosen, so every rank keeps the mask one process would choose from all the data
    - ``on_finalize``: parametrizations removed, pruned weights left at zero

    :param targets: modules to prune (names, ``re:`` patterns or class names); unset uses the
        architecture's default
    :param ignore: modules to leave alone, same syntax
    :param density: the fraction kept at the end, in (0, 1]; ``sparsity`` (its complement)
        is accepted instead
    :param init_density: the fraction kept at ``start``, ramped down to ``density`` by ``end``
    :param ramp: ``cubic`` (Zhu & Gupta 2017) or ``linear``
    :param method: ``l1`` magnitude, ``topk`` learnable scores, or ``activation``
        (|W| times input norms from calibration data, ranked per layer, one-shot only;
        ``WandaPruningModifier`` ranks per output row, as the Wanda paper does);
        ``SparsePruningModifier`` also has ``snip_momentum`` (DeepSpeed's block SNIP pruner,
        with its own schedule: see there)
    """

    targets: list[MatchPattern] | None = None
    ignore: list[MatchPattern] = Field(default_factory=list)
    density: float | None = None
    init_density: float = 1.0
    ramp: Ramp = "cubic"
    method: PruningMethod = "l1"

    _couplings: list[Coupling] = PrivateAttr(default_factory=list)
    _scorer: Scorer | None = PrivateAttr(default=None)
    _holder: MaskHolder | None = PrivateAttr(default=None)
    _masks: dict[int, torch.Tensor] = PrivateAttr(default_factory=dict)
    _frozen: bool = PrivateAttr(default=False)
    _reapplied: bool = PrivateAttr(default=False)

    #: whether ``method: snip_momentum`` (unstructured blocks over all layers) applies here
    supports_snip_momentum: ClassVar[bool] = False

    # ---------------------------------------------------------------- validation
    @model_validator(mode="before")
    @classmethod
    def _sparsity_to_density(cls, data: Any) -> Any:
        if isinstance(data, dict) and "sparsity" in data:
            data = dict(data)
            sparsity = data.pop("sparsity")
            if data.get("density") is not None:
                raise ValueError(
                    f"give density or sparsity, not both (density={data['density']}, "
                    f"sparsity={sparsity})"
                )
            if not isinstance(sparsity, int | float) or not 0.0 <= sparsity < 1.0:
                raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
            data["density"] = 1.0 - float(sparsity)
        return data

    @field_validator("density", "init_density")
    @classmethod
    def _in_unit_interval(cls, value: float | None, info: Any) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(
                f"{info.field_name} must be in (0, 1] (the fraction kept), got {value}"
            )
        return value

    @model_validator(mode="after")
    def _check_schedule(self) -> PruningModifierBase:
        if self.method == "snip_momentum" and not self.supports_snip_momentum:
            raise ValueError(
                f"method 'snip_momentum' prunes blocks of single weights, with "
                f"SparsePruningModifier; {type(self).__name__} takes method 'l1' or 'topk'"
            )
        if SCORERS[self.method].calibrated and self.start is not None:
            trained = " or ".join(repr(m) for m, s in SCORERS.items() if not s.calibrated)
            raise ValueError(
                f"method {self.method!r} scores with calibration data and runs in one shot: "
                f"leave start unset (got start={self.start}), or use method {trained} in training"
            )
        if self.end is not None and self.start is None:
            raise ValueError(f"end={self.end} needs a start (a training schedule)")
        if self.end is not None and self.start is not None and self.end < self.start:
            raise ValueError(f"end ({self.end}) must not come before start ({self.start})")
        if self.update is not None and self.update <= 0:
            raise ValueError(f"update must be positive, got {self.update}")
        final = self.final_density()
        if final is not None and self.init_density < final:
            raise ValueError(
                f"init_density ({self.init_density}) must be at least density ({final}): "
                "the schedule only removes weights"
            )
        return self

    def final_density(self) -> float | None:
        """The density reached at the end of the schedule."""
        return self.density

    def requires_calibration_data(self) -> bool:
        return SCORERS[self.method].calibrated

    def calibration_traits(self) -> CalibrationTraits:
        """The one calibrated scorer (``activation``) adds its input statistics over the ranks
        of a process group before it chooses masks (``ActivationScorer``)."""
        return CalibrationTraits(reduces_across_ranks=True)

    @property
    def scorer(self) -> Scorer:
        """The object that implements ``method`` (from initialize on)."""
        if self._scorer is None:
            raise RuntimeError(f"{type(self).__name__} has no scorer before initialize")
        return self._scorer

    # ---------------------------------------------------------------- for subclasses
    def resolve_couplings(self, model: torch.nn.Module) -> list[Coupling]:
        """The couplings this modifier prunes in ``model``."""
        raise NotImplementedError

    def select(self, coupling: Coupling, scores: torch.Tensor, density: float) -> torch.Tensor:
        """The boolean mask (per entry, or per unit) that keeps ``density`` of ``scores``."""
        total = coupling.n_units if coupling.structured else scores.numel()
        assert total is not None
        return topk_mask(scores, kept_count(total, density))

    def score_mask_for(self, coupling: Coupling, scores: torch.nn.Parameter, dim: int | None):
        """The parametrization that masks one tensor of ``coupling`` by learnable scores."""
        return ScoreMask(scores, dim)

    # ---------------------------------------------------------------- for scorers
    def hold_mask(self, index: int, mask: torch.Tensor) -> None:
        """Hold ``mask`` (per entry, or per unit) on every tensor of coupling ``index``: zeroed
        now, and again after every optimizer step until finalize."""
        assert self._holder is not None
        coupling = self._couplings[index]
        self._masks[index] = mask
        for member in coupling.members:
            for _, param in member_tensors(member):
                if member.dim is None:
                    full = mask
                else:
                    full = expand_unit_mask(mask, param.shape, member.dim if param.dim() > 1 else 0)
                self._holder.set(param, full)

    # ---------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State) -> None:
        if state.model is None:
            raise ValueError(f"{type(self).__name__} needs a model")
        self._couplings = self.resolve_couplings(state.model)
        if not self._couplings:
            raise ValueError(
                f"{type(self).__name__}: targets={self.targets} ignore={self.ignore} matched "
                "nothing to prune in the model"
            )
        self._check_sharded()
        check_finite_weights(
            ((m.name, m.module) for c in self._couplings for m in c.members), type(self).__name__
        )
        scorer_class = SCORERS[self.method]
        self._holder = MaskHolder(self, mask_gradients=scorer_class.masks_gradients)
        self._scorer = scorer_class(self, self._couplings)
        self._scorer.prepare(state.optimizer)
        logger.info(
            "{} prunes {} coupling(s) to density {} with method {}",
            type(self).__name__,
            len(self._couplings),
            self.final_density(),
            self.method,
        )

    def should_start(self, event: Event) -> bool:
        if not SCORERS[self.method].own_schedule:
            return super().should_start(event)
        return self.start is not None and self.start <= event.current_index

    def should_end(self, event: Event) -> bool:
        # a scorer with its own schedule stops pruning after ``end`` by itself and holds its
        # masks to finalize, so a run stopping at ``end`` still takes its last pruning step
        return not SCORERS[self.method].own_schedule and super().should_end(event)

    def _check_sharded(self) -> None:
        """Tensor-parallel and FSDP2-sharded (DTensor) weights are scored by ``l1`` only, whose
        scores every rank gathers whole (``L1Scorer``)."""
        sharded = [
            m.name
            for c in self._couplings
            for m in c.members
            if is_sharded(latent_weight(m.module))
        ]
        if sharded and self.method != "l1":
            raise ValueError(
                f"{type(self).__name__}: method {self.method!r} is not supported on "
                f"tensor-parallel or FSDP2-sharded (DTensor) weights, such as {sharded[0]}'s; "
                "use method 'l1' "
                "(every rank gathers the whole weight's scores and keeps the same mask)"
            )

    def on_start(self, state: State, event: Event) -> None:
        if not self.scorer.own_schedule:
            self.scorer.start(self._density(event))

    def on_event(self, state: State, event: Event) -> None:
        # masks hold from the first mask to finalize, also after the schedule has ended:
        # re-zeroed after each optimizer step, or at batch end when no step was seen (an
        # optimizer the session does not watch)
        if event.type_ == EventType.OPTIM_PRE_STEP and self._scorer is not None:
            self._scorer.before_optimizer_step()
        if not self._holder:
            return
        if event.type_ == EventType.OPTIM_POST_STEP:
            self._holder.reapply(state.optimizer)
            self._reapplied = True
        elif event.type_ == EventType.BATCH_END:
            if not self._reapplied:
                self._holder.reapply(state.optimizer)
            self._reapplied = False

    def on_update(self, state: State, event: Event) -> None:
        kind = event.type_
        training = kind == EventType.BATCH_START and not self._frozen
        if training and self.scorer.own_schedule:
            self.scorer.at_step(event)
        elif training and event.should_update(self.start, self.end, self.update):
            self.scorer.step(self._density(event))
        if kind == EventType.SEQUENTIAL_EPOCH_END:
            for module in event.modules:  # the layer (or model) just calibrated
                self.scorer.layer_calibrated(module)

    def on_end(self, state: State, event: Event) -> None:
        final = self.final_density()
        assert final is not None
        self.scorer.end(final)
        self._frozen = True

    def on_finalize(self, state: State) -> None:
        self.scorer.release()

    def _density(self, event: Event) -> float:
        final = self.final_density()
        assert final is not None
        return density_at(
            event.current_index,
            start=self.start,
            end=self.end,
            init_density=self.init_density,
            final_density=final,
            ramp=self.ramp,
        )

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Training state for a resumed run, by coupling index: the learnable ``scores`` and
        how many entries (or units) each keeps (``keep``) while TopK trains; the ``masks``
        held on the weights (per entry, or per unit for structured couplings); the density
        the schedule last applied, and whether the masks are ``frozen`` (the schedule ended)."""
        scorer = self._scorer
        return {
            "applied_density": scorer.density if scorer else None,
            "frozen": self._frozen,
            **(scorer.state_dict() if scorer else {"scores": {}, "keep": {}}),
            "masks": {str(i): mask.detach().clone() for i, mask in self._masks.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()`` into a run initialized (and started, when its schedule
        has begun) with the same recipe and model.

        TopK scores are copied into the Parameters this run created, which the optimizer
        already holds, so a checkpoint's optimizer state loaded afterwards applies to them.
        When the checkpoint's masks were frozen, the scores are released and the masks held.
        """
        if not state_dict:
            return
        scores, masks = state_dict.get("scores", {}), state_dict.get("masks", {})
        unknown = sorted(
            k for k in (*scores, *masks) if not k.isdigit() or int(k) >= len(self._couplings)
        )
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint has state for couplings {unknown}, but "
                f"this run prunes {len(self._couplings)} coupling(s); resume with the recipe and "
                "model it was saved with"
            )
        scorer = self.scorer
        scorer.load_state_dict(state_dict)
        scorer.density = state_dict.get("applied_density", scorer.density)
        if state_dict.get("frozen", False):
            scorer.release()  # frozen scores live on as the masks below
            self._frozen = True
        for key, mask in masks.items():
            index = int(key)
            device = self._couplings[index].members[0].module.weight.device
            self.hold_mask(index, mask.to(device))

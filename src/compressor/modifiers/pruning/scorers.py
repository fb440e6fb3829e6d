"""Scorers: what each pruning ``method`` does at each step of a pruning modifier's lifecycle.

The modifier owns its couplings, its density schedule and the masks held on the weights; its
scorer, one object per ``method``, decides how weights are scored and when masks are chosen:

- ``L1Scorer`` (``l1``): the magnitude of each weight; the masks follow the schedule.
- ``TopKScorer`` (``topk``, in ``topk.py``): learnable scores that train with the model.
- ``ActivationScorer`` (``activation``): |W| times the input norms from calibration data, in
  one shot.
- ``SnipMomentumScorer`` (``snip_momentum``, in ``snip_momentum.py``): block SNIP scores with
  momentum from the training gradients, pruned over all layers at once on its own schedule.

The numbers themselves (scores, top-k and N:M masks) are pure functions in ``scores.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
from loguru import logger
from torch.utils.hooks import RemovableHandle

from compressor.core import Event
from compressor.modifiers.pruning.coupling import Coupling, Member, latent_weight
from compressor.modifiers.pruning.scores import (
    activation_scores,
    input_square_sums,
    magnitude_scores,
    unit_scores,
)
from compressor.utils import distributed
from compressor.utils.sharding import full_tensor

__all__ = ["ActivationScorer", "L1Scorer", "Scorer", "ScorerHost"]


class ScorerHost(Protocol):
    """What a scorer uses of the pruning modifier that owns it (``PruningModifierBase``)."""

    method: str

    def final_density(self) -> float | None: ...

    def select(self, coupling: Coupling, scores: torch.Tensor, density: float) -> torch.Tensor: ...

    def score_mask_for(
        self, coupling: Coupling, scores: torch.nn.Parameter, dim: int | None
    ) -> Any: ...

    def hold_mask(self, index: int, mask: torch.Tensor) -> None: ...

    def register_hook(
        self, target: torch.nn.Module | torch.Tensor, hook: Callable[..., Any], kind: Any
    ) -> RemovableHandle: ...

    def track_handle(self, handle: RemovableHandle) -> RemovableHandle: ...


class Scorer:
    """What a pruning modifier asks of its ``method``.

    The modifier calls ``prepare`` at initialize; ``start``, ``step`` (when the training
    schedule updates) and ``end`` with the density its schedule gives; ``layer_calibrated``
    when a sequential pipeline has passed the calibration data through a layer; ``release`` at
    finalize. ``state_dict`` / ``load_state_dict`` carry the scorer's part of a checkpoint. A
    scorer chooses a coupling's mask with the modifier's ``select`` (which knows the mask's
    structure, such as N:M) and holds it on the weights with the modifier's ``hold_mask``.

    :param modifier: the modifier served
    :param couplings: the modifier's couplings, resolved at initialize
    """

    #: the scores come from calibration data, in one shot: no training schedule
    calibrated: ClassVar[bool] = False
    #: the scorer follows its own pruning steps (``at_step``) instead of the modifier's
    #: density ramp (``start`` / ``step`` / ``end``)
    own_schedule: ClassVar[bool] = False
    #: the gradients of pruned weights are zeroed (else only the weights, after each step)
    masks_gradients: ClassVar[bool] = True

    def __init__(self, modifier: ScorerHost, couplings: list[Coupling]) -> None:
        self.modifier = modifier
        self.couplings = couplings
        #: the density the masks follow (None before the first masks, and when calibrated)
        self.density: float | None = None

    # ---------------------------------------------------------------- lifecycle
    def prepare(self, optimizer: Any) -> None:
        """At initialize, before any mask: add what the method trains (nothing here).

        :param optimizer: the optimizer the session was given, or None
        """

    def start(self, density: float) -> None:
        """At start: the first masks."""
        self.apply(density)

    def step(self, density: float) -> None:
        """When the training schedule updates: the masks at its density."""
        self.apply(density)

    def layer_calibrated(self, layer: torch.nn.Module) -> None:
        """The calibration data has passed through ``layer`` (nothing here)."""

    def before_optimizer_step(self) -> None:
        """The gradients of an optimizer step are final (nothing here)."""

    def at_step(self, event: Event) -> None:
        """A batch starts while the modifier is active; only for ``own_schedule`` scorers."""
        raise NotImplementedError

    def end(self, density: float) -> None:
        """At end: the final masks, held unchanged from then on."""
        self.apply(density)

    def release(self) -> None:
        """Remove what ``prepare`` added to the model, keeping the masked values (nothing here)."""

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """By coupling index, the learnable ``scores`` and how many entries or units each keeps
        (``keep``); empty for a method without learnable scores."""
        return {"scores": {}, "keep": {}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``scores`` and ``keep`` from the modifier's checkpoint state.

        :raises ValueError: when the checkpoint has scores this run cannot hold
        """
        if state_dict.get("scores"):
            raise ValueError(
                f"{type(self.modifier).__name__}: the checkpoint holds learnable TopK scores, "
                f"but this run has none (method={self.modifier.method!r}); resume with the recipe "
                "it was saved with"
            )

    # ---------------------------------------------------------------- scores and masks
    def weight_scores(self, member: Member) -> torch.Tensor:
        """The importance of each weight of ``member``."""
        raise NotImplementedError

    def apply(self, density: float) -> None:
        """Make the masks keep ``density`` of every coupling."""
        raise NotImplementedError

    def scores(self, coupling: Coupling) -> torch.Tensor:
        """Importance per entry (unstructured) or per unit, summed over the scored members."""
        total: torch.Tensor | None = None
        for member in coupling.scored_members():
            per_weight = self.weight_scores(member)
            if coupling.n_units is None:
                return per_weight
            assert member.dim is not None
            units = unit_scores(per_weight, member.dim, coupling.n_units)
            total = units if total is None else total + units
        assert total is not None
        return total

    def choose_mask(self, index: int, density: float) -> None:
        """Hold the mask of coupling ``index`` that keeps ``density`` of its scores.

        Couplings are masked one after another, each scored after the ones before it are held:
        a module can be the consumer of one coupling and the producer of the next.
        """
        coupling = self.couplings[index]
        mask = self.modifier.select(coupling, self.scores(coupling), density)
        self.modifier.hold_mask(index, mask)

    def _log_density(self, density: float) -> None:
        logger.debug("{}: masks at density {:.4f}", type(self.modifier).__name__, density)


class L1Scorer(Scorer):
    """``l1``: the magnitude of each weight (of a unit: the sum over its weights in every
    scored member); the masks follow the density schedule.

    The weight scored is the trained (latent) one, also under quantization-aware training. A
    tensor-parallel weight is gathered whole first, so that every rank ranks the whole
    tensor (its units, or its entries for a per-layer top-k) and keeps the mask one process
    would keep.
    """

    def weight_scores(self, member: Member) -> torch.Tensor:
        return magnitude_scores(full_tensor(latent_weight(member.module)))

    def step(self, density: float) -> None:
        # at an unchanged density the masks already hold: the pruned weights are zero, the
        # lowest score, so the per-step top-k is skipped
        if density != self.density:
            self.apply(density)

    def apply(self, density: float) -> None:
        for index in range(len(self.couplings)):
            self.choose_mask(index, density)
        self.density = density
        self._log_density(density)


class ActivationScorer(Scorer):
    """``activation``: |W| times the L2 norm of each weight's input feature over the
    calibration data (Sun et al., "A Simple and Effective Pruning Approach for Large Language
    Models", Wanda, 2023, arXiv:2306.11695): Wanda's score, but compared across the whole
    coupling (per layer, as every method of the pruning modifiers ranks), not within each
    output row as the paper does. ``WandaPruningModifier`` is the paper's per-row
    comparison; this scorer is kept as it was, so existing recipes keep their results.

    From ``start``, forward hooks sum the squared inputs of every scored module. A coupling's
    mask is chosen at the final density once the data has passed through all its members:
    when a sequential pipeline has calibrated the layer holding them, else at ``end``. Under
    DDP the sums are added over every rank first, so every rank keeps the mask one process
    would choose from all the data.
    """

    calibrated = True

    def __init__(self, modifier: ScorerHost, couplings: list[Coupling]) -> None:
        super().__init__(modifier, couplings)
        self._square_sums: dict[str, torch.Tensor] = {}  # by module: per input feature
        self._rows: dict[str, int] = {}  # by module: how many input rows the sums cover
        self._hooks: list[Any] = []
        self._chosen: set[int] = set()  # couplings whose mask is chosen

    def weight_scores(self, member: Member) -> torch.Tensor:
        sums = self._square_sums.get(member.name)
        if sums is None:
            raise RuntimeError(
                f"{type(self.modifier).__name__}: no calibration inputs reached {member.name}; "
                "method 'activation' needs calibration data through the whole model"
            )
        return activation_scores(member.module.weight, sums)

    def start(self, density: float) -> None:
        """Record the inputs of every scored module; the masks come once the data has passed."""
        modules = {m.name: m.module for c in self.couplings for m in c.scored_members()}
        for name, module in modules.items():
            hook = self.modifier.register_hook(module, self._record(name), "forward")
            self._hooks.append(hook)

    def step(self, density: float) -> None:
        """Nothing: the masks come from calibration data, not from a training schedule."""

    def layer_calibrated(self, layer: torch.nn.Module) -> None:
        final = self.modifier.final_density()
        assert final is not None
        self._choose_within(layer, final)

    def end(self, density: float) -> None:
        self.apply(density)
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def apply(self, density: float) -> None:
        """Choose the masks of every coupling not chosen yet."""
        self._choose_within(None, density)

    def _choose_within(self, layer: torch.nn.Module | None, density: float) -> None:
        inside = None if layer is None else {id(m) for m in layer.modules()}
        for index, coupling in enumerate(self.couplings):
            if index in self._chosen:
                continue
            if inside is not None and not all(id(m.module) in inside for m in coupling.members):
                continue
            self._reduce(coupling)
            self.choose_mask(index, density)
            self._chosen.add(index)

    def _record(self, name: str):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            sums = input_square_sums(args[0], conv=isinstance(module, torch.nn.Conv2d))
            previous = self._square_sums.get(name)
            self._square_sums[name] = sums if previous is None else previous + sums
            self._rows[name] = self._rows.get(name, 0) + args[0].numel() // sums.numel()

        return hook

    def _reduce(self, coupling: Coupling) -> None:
        """Under DDP, sum each scored member's input statistics over every rank, so that all
        ranks select the mask one process would select from the union of their data (a no-op
        in one process). Every rank reaches this for the same couplings in the same order."""
        if not distributed.is_distributed():
            return
        for member in coupling.scored_members():
            weight = member.module.weight
            assert isinstance(weight, torch.Tensor)
            local = self._square_sums.get(member.name)
            total = (
                local.clone()
                if local is not None
                else torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
            )
            rows = torch.tensor([self._rows.get(member.name, 0)], device=total.device)
            distributed.all_reduce_(total, "sum")
            if distributed.all_reduce_(rows, "sum").item() > 0:
                self._square_sums[member.name] = total
                self._rows[member.name] = int(rows.item())

"""The part every pruning modifier shares: fields, schedule, scoring and holding the masks."""

from __future__ import annotations

from typing import Any, Literal

import torch
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator

from compressor.core import Event, EventType, State
from compressor.modifiers.base import Modifier
from compressor.modifiers.pruning.groups import Member, PruneGroup, member_tensors
from compressor.modifiers.pruning.masks import (
    MaskHolder,
    ScoreMask,
    add_score_mask,
    expand_unit_mask,
)
from compressor.modifiers.pruning.schedule import Ramp, density_at, kept_count
from compressor.modifiers.pruning.scores import (
    activation_scores,
    magnitude_scores,
    topk_mask,
    unit_scores,
)
from compressor.utils import distributed

__all__ = ["PruningMethod", "PruningModifierBase"]

PruningMethod = Literal["l1", "topk", "activation"]


class PruningModifierBase(Modifier):
    """Shared fields and lifecycle of the pruning modifiers (not registered itself).

    **Lifecycle**

    - ``on_initialize``: resolve the groups (targets and coupled modules); with ``topk``,
      create the learnable scores, parametrize the weights with them and add the scores to
      the optimizer the session was given (an optimizer created after ``initialize`` finds
      them in ``model.parameters()``)
    - ``on_start``: compute the first masks (``activation``: start recording input norms)
    - ``on_update``: on BATCH_START, when ``update`` says so, recompute the masks at the
      scheduled density
    - ``on_event``: after every optimizer step and at BATCH_END, zero the pruned weights
      again (until finalize, also after ``end``)
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
        (|W| times input norms from calibration data, one-shot only)
    """

    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)
    density: float | None = None
    init_density: float = 1.0
    ramp: Ramp = "cubic"
    method: PruningMethod = "l1"

    _groups: list[PruneGroup] = PrivateAttr(default_factory=list)
    _holder: MaskHolder | None = PrivateAttr(default=None)
    _score_masks: dict[int, list[ScoreMask]] = PrivateAttr(default_factory=dict)
    _param_handles: list[Any] = PrivateAttr(default_factory=list)
    _unit_masks: dict[int, torch.Tensor] = PrivateAttr(default_factory=dict)
    _group_masks: dict[int, torch.Tensor] = PrivateAttr(default_factory=dict)
    _stats: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)
    _stat_rows: dict[str, int] = PrivateAttr(default_factory=dict)
    _stat_handles: list[Any] = PrivateAttr(default_factory=list)
    _done: set[int] = PrivateAttr(default_factory=set)
    _frozen: bool = PrivateAttr(default=False)
    _applied_density: float | None = PrivateAttr(default=None)
    _reapplied: bool = PrivateAttr(default=False)

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
        if self.method == "activation" and self.start is not None:
            raise ValueError(
                "method 'activation' scores with calibration data and runs in one shot: leave "
                f"start unset (got start={self.start}), or use method 'l1' or 'topk' in training"
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
        return self.method == "activation"

    # ---------------------------------------------------------------- for subclasses
    def resolve_groups(self, model: torch.nn.Module) -> list[PruneGroup]:
        """The groups this modifier prunes in ``model``."""
        raise NotImplementedError

    def select(self, group: PruneGroup, scores: torch.Tensor, density: float) -> torch.Tensor:
        """The boolean mask (per entry, or per unit) that keeps ``density`` of ``scores``."""
        total = group.n_units if group.structured else scores.numel()
        assert total is not None
        return topk_mask(scores, kept_count(total, density))

    def score_mask_for(self, group: PruneGroup, scores: torch.nn.Parameter, dim: int | None):
        return ScoreMask(scores, dim)

    # ---------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State) -> None:
        if state.model is None:
            raise ValueError(f"{type(self).__name__} needs a model")
        self._groups = self.resolve_groups(state.model)
        if not self._groups:
            raise ValueError(
                f"{type(self).__name__}: targets={self.targets} ignore={self.ignore} matched "
                "nothing to prune in the model"
            )
        self._holder = MaskHolder(self)
        if self.method == "topk":
            self._attach_scores(state)
        logger.info(
            "{} prunes {} group(s) to density {} with method {}",
            type(self).__name__,
            len(self._groups),
            self.final_density(),
            self.method,
        )

    def on_start(self, state: State, event: Event) -> None:
        if self.method == "activation":
            self._record_input_norms()
        else:
            self._update_masks(self._density(event))

    def on_event(self, state: State, event: Event) -> None:
        # masks hold from the first mask to finalize, also after the schedule has ended:
        # re-zeroed after each optimizer step, or at batch end when no step was seen (an
        # optimizer the session does not watch)
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
        training = kind == EventType.BATCH_START and self.method != "activation"
        if training and not self._frozen and event.should_update(self.start, self.end, self.update):
            density = self._density(event)
            # l1 at an unchanged density is a no-op while masks hold (pruned weights are
            # zero, the lowest score), so the per-step top-k is skipped
            if self.method != "l1" or density != self._applied_density:
                self._update_masks(density)
        if kind == EventType.SEQUENTIAL_EPOCH_END and self.method == "activation":
            for module in event.modules:  # the layer (or model) just calibrated
                self._prune_calibrated(within=module)

    def on_end(self, state: State, event: Event) -> None:
        if self.method == "activation":
            self._prune_calibrated(within=None)
            for handle in self._stat_handles:
                handle.remove()
            self._stat_handles.clear()
        else:
            final = self.final_density()
            assert final is not None
            self._update_masks(final)
            if self.method == "topk":
                self._freeze_scores()
        self._frozen = True

    def on_finalize(self, state: State) -> None:
        self._release_parametrizations()

    # ---------------------------------------------------------------- masks
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

    def group_scores(self, group: PruneGroup) -> torch.Tensor:
        """Importance per entry (unstructured) or per unit, by ``l1`` or ``activation``."""
        total: torch.Tensor | None = None
        for member in group.scored_members():
            weight = member.module.weight
            if self.method == "activation":
                stats = self._stats.get(member.name)
                if stats is None:
                    raise RuntimeError(
                        f"{type(self).__name__}: no calibration inputs reached {member.name}; "
                        "method 'activation' needs calibration data through the whole model"
                    )
                per_weight = activation_scores(weight, stats)
            else:
                per_weight = magnitude_scores(weight)
            if group.n_units is None:
                return per_weight
            assert member.dim is not None
            units = unit_scores(per_weight, member.dim, group.n_units)
            total = units if total is None else total + units
        assert total is not None
        return total

    def _apply_group_mask(self, index: int, group: PruneGroup, mask: torch.Tensor) -> None:
        assert self._holder is not None
        self._group_masks[index] = mask
        if group.structured:
            self._unit_masks[index] = mask
        for member in group.members:
            for _, param in member_tensors(member):
                if member.dim is None:
                    full = mask
                else:
                    full = expand_unit_mask(mask, param.shape, member.dim if param.dim() > 1 else 0)
                self._holder.set(param, full)

    def _update_masks(self, density: float) -> None:
        for index, group in enumerate(self._groups):
            if self.method == "topk":
                total = (
                    group.n_units if group.structured else group.members[0].module.weight.numel()
                )
                assert total is not None
                for score_mask in self._score_masks[index]:
                    score_mask.keep = kept_count(total, density)
            else:
                self._apply_group_mask(
                    index, group, self.select(group, self.group_scores(group), density)
                )
        self._applied_density = density
        logger.debug("{}: masks at density {:.4f}", type(self).__name__, density)

    def current_unit_mask(self, index: int) -> torch.Tensor | None:
        """The per-unit mask of structured group ``index`` (None before any pruning)."""
        if index in self._score_masks:
            return self._score_masks[index][0].binary().detach().bool()
        return self._unit_masks.get(index)

    # ---------------------------------------------------------------- learnable scores
    def _attach_scores(self, state: State) -> None:
        created = []
        for index, group in enumerate(self._groups):
            init = self.group_scores(group)  # l1 magnitudes: the first mask is the l1 mask
            device = group.members[0].module.weight.device
            scores = torch.nn.Parameter(init.to(device))
            created.append(scores)
            masks = []
            for member in group.members:
                for name, param in member_tensors(member):
                    dim = member.dim if (member.dim is None or param.dim() > 1) else 0
                    score_mask = self.score_mask_for(group, scores, dim)
                    self._param_handles.append(
                        self.track_handle(
                            add_score_mask(member.module, name, score_mask, member.name)
                        )
                    )
                    masks.append(score_mask)
            self._score_masks[index] = masks
        optimizer = state.optimizer
        if optimizer is not None:
            known = {id(p) for g in optimizer.param_groups for p in g["params"]}
            new = [s for s in created if id(s) not in known]
            if new:
                optimizer.add_param_group({"params": new})
                logger.info(
                    "{}: added {} learnable score tensor(s) to the optimizer",
                    type(self).__name__,
                    len(new),
                )

    def _freeze_scores(self) -> None:
        """Turn the learned scores into fixed masks held on the weights."""
        frozen = {}
        for index in self._score_masks:
            frozen[index] = self._score_masks[index][0].binary().detach().bool()
        self._release_parametrizations()
        for index, group in enumerate(self._groups):
            self._apply_group_mask(index, group, frozen[index])

    def _release_parametrizations(self) -> None:
        for handle in self._param_handles:
            handle.remove()
        self._param_handles.clear()
        self._score_masks.clear()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Training state for a resumed run, by group index: the learnable ``scores`` and
        how many entries (or units) each keeps (``keep``) while TopK trains; the ``masks``
        held on the weights (per entry, or per unit for structured groups); the density the
        schedule last applied, and whether the masks are ``frozen`` (the schedule ended)."""
        return {
            "applied_density": self._applied_density,
            "frozen": self._frozen,
            "scores": {
                str(i): masks[0].scores.detach().clone() for i, masks in self._score_masks.items()
            },
            "keep": {str(i): masks[0].keep for i, masks in self._score_masks.items()},
            "masks": {str(i): mask.detach().clone() for i, mask in self._group_masks.items()},
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
        name = type(self).__name__
        scores, masks = state_dict.get("scores", {}), state_dict.get("masks", {})
        unknown = sorted(
            k for k in (*scores, *masks) if not k.isdigit() or int(k) >= len(self._groups)
        )
        if unknown:
            raise ValueError(
                f"{name}: the checkpoint has state for groups {unknown}, but this run prunes "
                f"{len(self._groups)} group(s); resume with the recipe and model it was saved with"
            )
        if scores and not self._score_masks:
            raise ValueError(
                f"{name}: the checkpoint holds learnable TopK scores, but this run has none "
                f"(method={self.method!r}); resume with the recipe it was saved with"
            )
        for key, value in scores.items():
            score_masks = self._score_masks[int(key)]
            target = score_masks[0].scores
            if value.shape != target.shape:
                raise ValueError(
                    f"{name}: group {self._groups[int(key)].name} has scores of shape "
                    f"{tuple(target.shape)}, the checkpoint {tuple(value.shape)}"
                )
            with torch.no_grad():
                target.copy_(value)
            for score_mask in score_masks:
                score_mask.keep = int(state_dict["keep"][key])
        self._applied_density = state_dict.get("applied_density", self._applied_density)
        if state_dict.get("frozen", False):
            self._release_parametrizations()  # frozen scores live on as the masks below
            self._frozen = True
        for key, mask in masks.items():
            index = int(key)
            device = self._groups[index].members[0].module.weight.device
            self._apply_group_mask(index, self._groups[index], mask.to(device))

    # ---------------------------------------------------------------- calibration statistics
    def _record_input_norms(self) -> None:
        modules = {m.name: m.module for g in self._groups for m in g.scored_members()}
        for name, module in modules.items():
            self._stat_handles.append(self.register_hook(module, self._stats_hook(name), "forward"))

    def _stats_hook(self, name: str):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach().float()
            if isinstance(module, torch.nn.Conv2d):
                sq = x.transpose(0, 1).reshape(x.shape[1], -1).pow(2).sum(dim=1)
            else:
                sq = x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0)
            previous = self._stats.get(name)
            self._stats[name] = sq if previous is None else previous + sq
            self._stat_rows[name] = self._stat_rows.get(name, 0) + x.numel() // sq.numel()

        return hook

    def _prune_calibrated(self, within: torch.nn.Module | None) -> None:
        final = self.final_density()
        assert final is not None
        inside = None if within is None else {id(m) for m in within.modules()}
        for index, group in enumerate(self._groups):
            if index in self._done:
                continue
            if inside is not None and not all(id(m.module) in inside for m in group.members):
                continue
            self._reduce_stats(group)
            self._apply_group_mask(
                index, group, self.select(group, self.group_scores(group), final)
            )
            self._done.add(index)

    def _reduce_stats(self, group: PruneGroup) -> None:
        """Under DDP, sum each scored member's input statistics over every rank, so that all
        ranks select the mask one process would select from the union of their data (a no-op
        in one process). Every rank reaches this for the same groups in the same order."""
        if not distributed.is_distributed():
            return
        for member in group.scored_members():
            weight = member.module.weight
            assert isinstance(weight, torch.Tensor)
            local = self._stats.get(member.name)
            total = (
                local.clone()
                if local is not None
                else torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
            )
            rows = torch.tensor([self._stat_rows.get(member.name, 0)], device=total.device)
            distributed.all_reduce_(total, "sum")
            if distributed.all_reduce_(rows, "sum").item() > 0:
                self._stats[member.name] = total
                self._stat_rows[member.name] = int(rows.item())


def find_member(model: torch.nn.Module, name: str, dim: int | None) -> Member:
    """The module ``name`` of ``model`` as a group member (a clear error when absent)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no module {name!r}") from None
    return Member(name=name, module=module, dim=dim)

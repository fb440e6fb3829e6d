"""``MagnitudePruningModifier`` and ``ConstantPruningModifier`` as llm-compressor recipes
write them.

llm-compressor targets *parameters* (``re:.*weight``, ``model.layers.0.mlp.down_proj.weight``,
``__ALL_PRUNABLE__``), and so do these two: a Linear or Conv2d layer is pruned when its
``weight``'s full name matches; the catch-all names select every prunable layer but the output
embeddings. A field we do not support is an error that
names it, never dropped. One difference is deliberate and documented: masks hold until the run
finalizes (llm-compressor lets pruned weights regrow after ``end`` unless ``leave_enabled``,
which it has deprecated).
"""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.utils.match import match_name, match_named_parameters
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator

from compressor.core import Event, EventType, State
from compressor.modifiers.base import Modifier
from compressor.modifiers.pruning.coupling import Coupling
from compressor.modifiers.pruning.masks import MaskHolder
from compressor.modifiers.pruning.sparse.base import SparsePruningModifier
from compressor.utils.patterns import MatchPattern

__all__ = [
    "ConstantPruningModifier",
    "MagnitudePruningModifier",
    "layers_with_weights_matching",
    "parameter_targets",
]

_CATCH_ALL = {"__ALL_PRUNABLE__", "__ALL__"}
_PRUNABLE = (torch.nn.Linear, torch.nn.Conv2d)


def parameter_targets(targets: Any) -> Any:
    """llm-compressor targets as a list; None (every prunable layer) for the catch-alls.
    Anything else than a string or a list is returned as it is, for the field to refuse."""
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list):
        return targets
    return None if any(isinstance(t, str) and t in _CATCH_ALL for t in targets) else targets


def layers_with_weights_matching(
    model: torch.nn.Module, targets: list[str] | None, ignore: list[str], owner: str
) -> list[str]:
    """Names of the Linear/Conv2d layers whose ``weight`` parameter matches ``targets`` (as
    llm-compressor matches parameters); every such layer but the output embeddings when
    ``targets`` is None.

    :raises ValueError: when nothing matches, naming the targets
    """
    if targets is None:
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [
            n for n, m in model.named_modules() if isinstance(m, _PRUNABLE) and m is not out_emb
        ]
        names = [n for n in names if not any(match_name(n, i) for i in ignore)]
    else:
        names = [
            fqn.rsplit(".", 1)[0]
            for fqn, module, _ in match_named_parameters(model, targets, ignore)
            if fqn.endswith(".weight") and isinstance(module, _PRUNABLE)
        ]
    if not names:
        raise ValueError(f"{owner}.targets={targets!r} matches no Linear or Conv2d weight")
    return names


def _reject(data: dict[str, Any], key: str, allowed: Any, why: str) -> None:
    if key in data and data[key] != allowed:
        raise ValueError(f"{key}={data[key]!r} is not supported: {why}")
    data.pop(key, None)


def _refuse_ambiguous_n_m(structure: Any) -> None:
    """An N:M other than N = M/2 has two meanings: llm-compressor's one-shot modifiers prune
    N of every M, ``SparsePruningModifier`` keeps N (and llm-compressor's magnitude pruning
    takes no N:M at all), so a recipe that names it here cannot say which."""
    if not isinstance(structure, str) or ":" not in structure:
        return
    n, _, m = structure.partition(":")
    if n.strip().isdigit() and m.strip().isdigit() and 2 * int(n) != int(m) and int(n):
        raise ValueError(
            f"MagnitudePruningModifier: mask_structure {structure!r} is ambiguous: "
            "llm-compressor's SparseGPT and Wanda prune N of every M, SparsePruningModifier "
            "keeps N, and llm-compressor's MagnitudePruningModifier has no N:M masks; write "
            "SparsePruningModifier with mask_structure 'kept:M' instead"
        )


@Modifier.register()
class MagnitudePruningModifier(SparsePruningModifier):
    """Gradual magnitude pruning with llm-compressor's field names (Zhu & Gupta 2017).

    Read into ``SparsePruningModifier``: ``init_sparsity``/``final_sparsity`` become
    ``init_density``/``density``, ``update_scheduler`` (``cubic`` or ``linear``) becomes
    ``ramp``, ``mask_structure`` is kept (an N:M other than 2:4 is refused as ambiguous);
    ``targets`` keep llm-compressor's meaning
    (parameter names or patterns).
    ``apply_globally: true``, ``leave_enabled: true`` and non-empty ``scheduler_args`` are
    errors (not supported). The recipe it writes back uses our field names.

    **Lifecycle**: that of ``SparsePruningModifier``.
    """

    @model_validator(mode="before")
    @classmethod
    def _from_llmcompressor(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "init_sparsity" in data:
            data["init_density"] = 1 - float(data.pop("init_sparsity"))
        if "final_sparsity" in data:
            data["density"] = 1 - float(data.pop("final_sparsity"))
        if "update_scheduler" in data:
            data["ramp"] = data.pop("update_scheduler")
        if "targets" in data:
            data["targets"] = parameter_targets(data["targets"])
        _refuse_ambiguous_n_m(data.get("mask_structure"))
        _reject(data, "apply_globally", False, "masks are chosen per layer")
        _reject(data, "leave_enabled", False, "masks always hold until finalize here")
        _reject(data, "scheduler_args", {}, "the ramps take no arguments")
        return data

    def resolve_couplings(self, model: torch.nn.Module) -> list[Coupling]:
        names = layers_with_weights_matching(model, self.targets, self.ignore, type(self).__name__)
        return SparsePruningModifier.resolve_couplings(
            self.model_copy(update={"targets": names, "ignore": []}), model
        )


@Modifier.register()
class ConstantPruningModifier(Modifier):
    """Keeps the zeros a model already has through training (llm-compressor's name).

    The mask of each targeted weight is where it is non-zero when the modifier starts;
    from then on the weight and its gradient are masked and the zeros are restored after
    every optimizer step, until finalize.

    **Lifecycle**

    - ``on_initialize``: resolve the targeted layers (an error when none match)
    - ``on_start``: record each weight's non-zero pattern as its mask
    - ``on_event``: after each optimizer step (and at batch end), zero the masked entries
    - ``on_finalize``: drop the masks; the zeros stay in the weights

    :param targets: parameter names or ``re:`` patterns (llm-compressor's); unset or
        ``__ALL_PRUNABLE__`` means every Linear and Conv2d but the output embeddings
    :param ignore: modules to leave alone
    """

    targets: list[MatchPattern] | None = None
    ignore: list[MatchPattern] = Field(default_factory=list)

    _holder: MaskHolder | None = PrivateAttr(default=None)
    _layers: list[torch.nn.Module] = PrivateAttr(default_factory=list)

    @field_validator("targets", mode="before")
    @classmethod
    def _catch_all(cls, value: Any) -> Any:
        return parameter_targets(value)

    def on_initialize(self, state: State) -> None:
        model = state.model
        names = layers_with_weights_matching(model, self.targets, self.ignore, type(self).__name__)
        self._layers = [model.get_submodule(n) for n in names]
        self._holder = MaskHolder(self)

    def on_start(self, state: State, event: Event) -> None:
        assert self._holder is not None
        total = kept = 0
        for layer in self._layers:
            mask = layer.weight.detach() != 0
            self._holder.set(layer.weight, mask)
            total += mask.numel()
            kept += int(mask.sum())
        logger.info(
            "ConstantPruningModifier holds the zeros of {} layer(s): density {:.3f}",
            len(self._layers),
            kept / max(total, 1),
        )

    def on_event(self, state: State, event: Event) -> None:
        if self._holder and event.type_ in (EventType.OPTIM_POST_STEP, EventType.BATCH_END):
            self._holder.reapply(state.optimizer)

    def on_finalize(self, state: State) -> None:
        if self._holder is not None:
            self._holder.reapply()
            self._holder.clear()

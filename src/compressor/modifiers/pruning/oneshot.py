"""What one-shot sparsity modifiers (SparseGPT, Wanda) share: llm-compressor's fields, their
validation, and which Linears each target prunes at which sparsity.

llm-compressor's ``targets`` name *layers* (``Linear`` by default, often the decoder layers,
``re:model.layers.\\d+$``); every Linear inside a matched layer (or the layer itself, when it
is a Linear) is pruned unless ``ignore`` names it. A ``sparsity`` list gives one value per
matched layer, in model order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from compressed_tensors.offload import OffloadCache, update_offload_parameter
from compressed_tensors.utils import match_named_modules
from compressed_tensors.utils.match import match_targets
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator

from compressor.core.events import Event, EventType
from compressor.core.state import State
from compressor.modifiers.base import CalibrationTraits, Modifier
from compressor.modifiers.moe import ExpertCalibrationFields, ExpertCoverage, prepare_experts
from compressor.modifiers.pruning.owl import (
    dense_square_sums,
    outlier_ratio,
    owl_layer_sparsities,
)
from compressor.utils import distributed
from compressor.utils.memory import overwrite_all_

__all__ = [
    "OneShotSparsityModifier",
    "SparsityTarget",
    "apply_owl",
    "parse_n_m",
    "resolve_sparsity_targets",
    "write_pruned_weight",
]


def parse_n_m(value: str) -> tuple[int, int] | None:
    """``mask_structure`` as llm-compressor's one-shot modifiers read it: ``"0:0"`` (or
    ``"unstructured"``) is unstructured (None); ``"N:M"`` *prunes* N of every M consecutive
    input weights (llm-compressor's SparseGPT and Wanda pick the N of least score in each
    group of M), so its sparsity is N/M. Returned as ``(kept, M)``, ``kept = M - N``, the
    form the numeric functions (``sparsegpt_prune``, ``wanda_mask``) take. Only 2:4 reads the
    same either way: "1:4" prunes one weight of four here, not three."""
    if value in ("0:0", "unstructured"):
        return None
    parts = value.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = (int(p) for p in parts)
        if 0 < n < m:
            return m - n, m
    raise ValueError(
        f"mask_structure must be '0:0' (unstructured) or 'N:M' with 0 < N < M (prune N of "
        f"every M weights, such as '2:4'); got {value!r}"
    )


@dataclass
class SparsityTarget:
    """A Linear to prune: the module, its sparsity, and the matched target layer it is in."""

    module: torch.nn.Linear
    sparsity: float
    layer: str


class OneShotSparsityModifier(ExpertCalibrationFields, Modifier):
    """The recipe fields of llm-compressor's one-shot sparsity modifiers, validated when the
    recipe is parsed (a base class, not registered itself).

    :param sparsity: the fraction pruned, in [0, 1); or one value per matched target layer
    :param mask_structure: ``0:0`` unstructured, or ``N:M``: prune N of every M consecutive
        input weights, as llm-compressor's code does (``2:4``: two of four; ``1:4``: one of
        four, sparsity 0.25); with N:M the sparsity is N/M and ``sparsity`` may be left unset
    :param sparsity_profile: ``owl``: layer sparsities from their outlier ratios (``owl.py``),
        keeping the model's total at ``sparsity``. The outlier ratios come from one dense pass
        of the calibration data at calibration start (``choose_owl_sparsities``); the layers
        are then pruned one at a time, as with one sparsity; unstructured masks only
    :param owl_m: OWL's outlier threshold, a multiple of the mean score (with ``owl``)
    :param owl_lmbda: OWL's spread: layer sparsities range over ``sparsity +- owl_lmbda``
        (with ``owl``)
    :param targets: layers whose Linears are pruned (names, ``re:`` patterns, class names)
    :param ignore: Linears left alone, same syntax
    :param sequential_update: accepted for old recipes; layers are always pruned one at a time
    :param calibrate_all_experts: see ``compressor.modifiers.moe.ExpertCalibrationFields``:
        mixture-of-experts weights are unfolded into one Linear per expert, each pruned on
        statistics from every calibration token (routers stay dense)
    :param min_expert_tokens: see ExpertCalibrationFields
    :param moe_mappings: see ExpertCalibrationFields
    """

    _modules: dict[str, SparsityTarget] = PrivateAttr(default_factory=dict)
    _pruned: set[str] = PrivateAttr(default_factory=set)
    _coverage: ExpertCoverage | None = PrivateAttr(default=None)

    sparsity: float | list[float] | None = None
    mask_structure: str = "0:0"
    sparsity_profile: str | None = None
    owl_m: int | None = None
    owl_lmbda: float | None = None
    targets: str | list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=list)
    sequential_update: bool | None = None

    @field_validator("sparsity")
    @classmethod
    def _sparsity_in_range(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        for item in values:
            if item is not None and not 0.0 <= item < 1.0:
                raise ValueError(f"sparsity must be in [0, 1), got {item!r}")
        return value

    @field_validator("mask_structure")
    @classmethod
    def _valid_structure(cls, value: str) -> str:
        parse_n_m(value)
        return value

    @model_validator(mode="after")
    def _check_sparsity_fields(self) -> OneShotSparsityModifier:
        n_m = parse_n_m(self.mask_structure)
        for field in ("start", "end", "update"):
            if getattr(self, field) is not None:
                raise ValueError(
                    f"{field}={getattr(self, field)!r}: {type(self).__name__} runs only in "
                    "post-training calibration (oneshot); leave start, end and update unset"
                )
        owl = (
            self.sparsity_profile is not None,
            self.owl_m is not None,
            self.owl_lmbda is not None,
        )
        if any(owl) and not all(owl):
            raise ValueError(
                "give all of sparsity_profile: owl, owl_m and owl_lmbda, or none of them "
                f"(got sparsity_profile={self.sparsity_profile!r}, owl_m={self.owl_m!r}, "
                f"owl_lmbda={self.owl_lmbda!r})"
            )
        if self.sparsity_profile is not None:
            if self.sparsity_profile.lower() != "owl":
                raise ValueError(
                    f"sparsity_profile must be 'owl' or unset, got {self.sparsity_profile!r}"
                )
            if n_m is not None or not isinstance(self.sparsity, float | int):
                raise ValueError(
                    "sparsity_profile: owl needs one sparsity (a number) and an unstructured "
                    f"mask (mask_structure 0:0); got sparsity={self.sparsity!r}, "
                    f"mask_structure={self.mask_structure!r}"
                )
        if n_m is None and self.sparsity is None:
            raise ValueError("sparsity is required with an unstructured mask (mask_structure 0:0)")
        if n_m is not None:
            _check_n_m_sparsity(self.mask_structure, n_m, self.sparsity)
        return self

    def n_m(self) -> tuple[int, int] | None:
        """``mask_structure`` as ``(kept, M)`` (``parse_n_m``), None when unstructured."""
        return parse_n_m(self.mask_structure)

    def uses_owl(self) -> bool:
        return self.sparsity_profile is not None

    def target_list(self) -> list[str]:
        return [self.targets] if isinstance(self.targets, str) else list(self.targets)

    # ---------------------------------------------------------------- shared lifecycle
    def requires_calibration_data(self) -> bool:
        return True

    def calibration_traits(self) -> CalibrationTraits:
        return CalibrationTraits(
            supports_offloaded_models=True,  # weights written with update_offload_parameter
            reads_outputs=False,  # forward pre-hooks only
            merges_batches=True,  # statistics sum over tokens
            in_stages=True,
            reduces_across_ranks=True,  # Hessians and square sums, reduced before pruning
        )

    def on_initialize(self, state: State) -> None:
        owner = type(self).__name__
        if state.model is None:
            raise ValueError(f"{owner} needs a model in the state")
        experts = prepare_experts(state.model, list(self.ignore), owner, tuple(self.moe_mappings))
        self._modules = resolve_sparsity_targets(state.model, self, owner)
        for name in list(self._modules):  # the routing stays exact
            if any(name == m or name.startswith(m + ".") for m in experts.exact):
                del self._modules[name]
        logger.info("{} will prune {} Linear(s)", owner, len(self._modules))

    def start_expert_coverage(self, state: State) -> None:
        """All-expert calibration and per-expert token counts, from calibration start."""
        assert state.model is not None
        self._coverage = ExpertCoverage.started_for(self, state.model)

    def end_expert_coverage(self) -> None:
        """Log the tokens each expert calibrated on (warn for starved experts)."""
        if self._coverage is not None:
            self._coverage.end()

    def choose_owl_sparsities(self, state: State, event: Event) -> None:
        """With ``sparsity_profile: owl``, at calibration start: run the calibration batches
        (``event.batches``) once through the dense model for every target's input norms
        (summed over the ranks under a process group), and set each target layer's sparsity
        from its outlier ratio (``apply_owl``). Nothing without OWL.

        :raises ValueError: OWL started without calibration batches; a target no batch reached
        """
        if not self.uses_owl():
            return
        owner = type(self).__name__
        batches = list(event.batches)
        if not batches:
            raise ValueError(
                f"{owner}: sparsity_profile: owl started on {event.type_} without calibration "
                "batches; run it in oneshot with a dataset"
            )
        assert state.model is not None
        linears = {name: target.module for name, target in self._modules.items()}
        sums = dense_square_sums(state.model, linears, batches)
        norms: dict[str, torch.Tensor] = {}
        for name, module in linears.items():
            total = distributed.reduce_optional(
                sums.get(name), (module.in_features,), "sum", device=module.weight.device
            )
            if total is None:
                raise ValueError(f"{owner}: {name} received no calibration data; OWL needs it")
            norms[name] = total.sqrt()
        apply_owl(self._modules, norms, self, owner)

    def calibrated_targets(self, event: Event) -> list[str]:
        """The targets inside the modules a SEQUENTIAL_EPOCH_END has just calibrated, to prune
        now; none for other events."""
        if event.type_ != EventType.SEQUENTIAL_EPOCH_END:
            return []
        inside = {id(m) for part in event.modules for m in part.modules()}
        return [name for name, target in self._modules.items() if id(target.module) in inside]

    def on_finalize(self, state: State) -> None:
        if self.started and not self.ended:
            self.on_end(state, Event(type_=EventType.FINALIZE))
        missing = [name for name in self._modules if name not in self._pruned]
        if missing:
            raise ValueError(
                f"{type(self).__name__} never calibrated, so it pruned nothing: {missing[:4]}; "
                "run it with calibration data (oneshot with a dataset)"
            )


def _check_n_m_sparsity(
    structure: str, kept_m: tuple[int, int], sparsity: float | list[float] | None
) -> None:
    """An N:M ``mask_structure`` with a ``sparsity`` that contradicts it is refused; one that
    matches the other reading ("keep N", sparsity ``1 - N/M``) gets an error that says so,
    as it is most likely a recipe written with that meaning."""
    kept, m = kept_m
    pruned = m - kept
    if sparsity is None:
        if pruned != kept:
            logger.info(
                "mask_structure {!r} prunes {} of every {} weights (llm-compressor's meaning: "
                "sparsity {:g}); write '{}:{}' to keep {} instead",
                structure,
                pruned,
                m,
                pruned / m,
                kept,
                m,
                pruned,
            )
        return
    values = sparsity if isinstance(sparsity, list) else [sparsity]
    implied = pruned / m
    if all(abs(v - implied) <= 1e-9 for v in values):
        return
    if all(abs(v - kept / m) <= 1e-9 for v in values):
        raise ValueError(
            f"mask_structure {structure!r} prunes {pruned} of every {m} weights (sparsity "
            f"{implied:g}), as in llm-compressor, but sparsity={sparsity} reads it as keeping "
            f"{pruned} of {m}: for sparsity {kept / m:g} write mask_structure '{kept}:{m}'; "
            f"for {implied:g}, give sparsity {implied:g} or leave it unset"
        )
    raise ValueError(
        f"sparsity={sparsity} contradicts mask_structure {structure!r}, which prunes "
        f"{pruned} of every {m} weights ({implied:g}); give that or leave sparsity unset"
    )


def resolve_sparsity_targets(
    model: torch.nn.Module,
    fields: OneShotSparsityModifier,
    owner: str,
) -> dict[str, SparsityTarget]:
    """Every Linear the fields prune, by name, with its sparsity and target layer.

    :raises ValueError: no layer matches; a matched layer is a weight-carrying module that is
        not a Linear, or holds no Linear; a sparsity list of another length than the matched
        layers; N:M whose M does not divide a Linear's input width (each naming the module)
    """
    targets = fields.target_list()
    layers = list(match_named_modules(model, targets))
    if not layers:
        raise ValueError(f"{owner}: targets {targets} match no module of the model")
    # a layer inside another matched layer is pruned through the outer one
    names = [name for name, _ in layers]
    layers = [
        (name, layer)
        for name, layer in layers
        if not any(name.startswith(other + ".") for other in names if other != name)
    ]
    sparsity = fields.sparsity
    n_m = fields.n_m()
    if isinstance(sparsity, list) and len(sparsity) != len(layers):
        raise ValueError(
            f"{owner}: sparsity has {len(sparsity)} values but targets {targets} match "
            f"{len(layers)} layers ({', '.join(n for n, _ in layers[:4])}"
            f"{', ...' if len(layers) > 4 else ''})"
        )
    default = 1.0 - n_m[0] / n_m[1] if n_m is not None else 0.0  # n_m is (kept, M)
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    out_emb = get_output_embeddings() if callable(get_output_embeddings) else None
    chosen: dict[str, SparsityTarget] = {}
    for index, (layer_name, layer) in enumerate(layers):
        if isinstance(sparsity, list):
            layer_sparsity = sparsity[index]
        else:
            layer_sparsity = sparsity if sparsity is not None else default
        if not isinstance(layer, torch.nn.Linear) and "weight" in layer._parameters:
            raise ValueError(
                f"{owner}: target {layer_name} is a {type(layer).__name__}; only Linear "
                "weights are pruned (narrow targets or add it to ignore)"
            )
        found = 0
        for sub_name, module in layer.named_modules():
            name = f"{layer_name}.{sub_name}" if sub_name else layer_name
            if not isinstance(module, torch.nn.Linear):
                continue
            found += 1
            if match_targets(name, module, fields.ignore):
                continue
            if n_m is not None and module.in_features % n_m[1]:
                raise ValueError(
                    f"{owner}: mask_structure {fields.mask_structure!r}: M={n_m[1]} does not "
                    f"divide the input width {module.in_features} of {name}; add it to ignore"
                )
            if module is out_emb:
                logger.warning(
                    "{}: {} (the output embeddings) is pruned; add it to ignore if that is "
                    "not intended",
                    owner,
                    name,
                )
            chosen[name] = SparsityTarget(module, float(layer_sparsity), layer_name)
        if not found:
            raise ValueError(
                f"{owner}: target {layer_name} is a {type(layer).__name__} that holds no "
                "Linear; only Linear weights are pruned"
            )
    if not chosen:
        raise ValueError(f"{owner}: every Linear matched by {targets} is in ignore {fields.ignore}")
    return chosen


def apply_owl(
    targets: dict[str, SparsityTarget],
    norms: dict[str, torch.Tensor],
    fields: OneShotSparsityModifier,
    owner: str,
) -> None:
    """Set every target's sparsity from OWL (``owl.py``), in place: each target layer's
    outlier ratio from its Linears' ``|W| * norms`` (``norms``: each Linear's per-input-feature
    norm, up to one factor common to all), and the layer sparsities around ``fields.sparsity``
    that keep the total."""
    assert fields.owl_m is not None and fields.owl_lmbda is not None
    assert isinstance(fields.sparsity, float | int)
    layers: dict[str, list[str]] = {}
    for name, target in targets.items():
        layers.setdefault(target.layer, []).append(name)
    ratios, sizes = [], []
    for names in layers.values():
        scores = [targets[n].module.weight.detach().abs() * norms[n] for n in names]
        ratios.append(outlier_ratio(scores, fields.owl_m))
        sizes.append(sum(targets[n].module.weight.numel() for n in names))
    sparsities = owl_layer_sparsities(ratios, sizes, float(fields.sparsity), fields.owl_lmbda)
    for (layer, names), ratio, sparsity in zip(layers.items(), ratios, sparsities, strict=True):
        logger.info(
            "{}: OWL layer {}: outlier ratio {:.4f}, sparsity {:.4f}", owner, layer, ratio, sparsity
        )
        for name in names:
            targets[name].sparsity = sparsity


def write_pruned_weight(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """Write ``weight`` as ``module``'s weight where it lives: through the offload cache of a
    model offloaded to disk, else into the weight's own storage (fresh pages, not a
    copy-on-write of a memory-mapped checkpoint)."""
    if isinstance(module._parameters, OffloadCache):
        update_offload_parameter(module, "weight", weight.contiguous())
    else:
        overwrite_all_([(module.weight.data, weight)])

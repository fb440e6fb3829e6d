"""DeepSpeed ``compression_training`` -> our modifiers (``Recipe.from_deepspeed``).

Every key DeepSpeed reads either maps to a field of one of our modifiers or is rejected with a
``RecipeError`` naming the technique, the group and the key. Each resolved mapping is logged.
Each DeepSpeed group becomes one modifier in its own recipe group, ``<technique>_<group>``.
The mapping, key by key and technique by technique (DeepSpeed 0.19.6 semantics), is the user
documentation in ``docs/deepspeed.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loguru import logger
from pydantic import ValidationError

from compressor.modifiers.base import Modifier, get_modifier_class
from compressor.recipe.deepspeed.config import (
    DeepSpeedCompressionConfig,
    DeepSpeedGroup,
    ParsedTechnique,
    load_deepspeed_config,
)
from compressor.recipe.errors import RecipeError

__all__ = ["deepspeed_modifiers"]

_PRUNING = {
    "sparse_pruning": "SparsePruningModifier",
    "row_pruning": "RowPruningModifier",
    "head_pruning": "HeadPruningModifier",
    "channel_pruning": "ChannelPruningModifier",
}
_NO_EFFECT = ("quantizer_kernel", "quantize_verbose")


def _targets(keys: list[str]) -> list[str] | None:
    return None if keys == ["*"] else [f"re:.*{key}" for key in keys]


def _build(kind: str, where: str, **fields: Any) -> Modifier:
    try:
        modifier = get_modifier_class(kind).model_validate(fields)
    except ValidationError as err:
        raise RecipeError(f"DeepSpeed {where}: cannot be expressed as {kind}: {err}") from None
    modifier.group = where.replace(" -> different_groups -> ", "_")
    logger.info("DeepSpeed {} -> {} {} (recipe group {})", where, kind, fields, modifier.group)
    return modifier


def _weight_args(shared: Any, bits: int, groups: int) -> dict[str, Any]:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": shared.quantization_type == "symmetric",
        "strategy": "tensor" if groups == 1 else "channel",
    }


def _activation_args(shared: Any, bits: int) -> dict[str, Any]:
    # DeepSpeed's dynamic activation quantizer takes one range per token (its num_groups is
    # the number of rows of the flattened input); the static one a single running range
    dynamic = shared.range_calibration == "dynamic"
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": shared.quantization_type == "symmetric",
        "strategy": "token" if dynamic else "tensor",
        "dynamic": dynamic,
    }


# DeepSpeed quantizes weights to ternary values at 2 bits and to binary values at 1 bit (its
# TernaryQuantizer / BinaryQuantizer and the MoQ quantizer's quantize_tenary / quantize_binary)
_LOW_BITS = {2: "ternary", 1: "binary"}


def _low_bit_levels(shared: Any, params: Any, where: str) -> str | None:
    """``low_bit_weights`` for a weight group at 1 or 2 target bits (None above)."""
    levels = _LOW_BITS.get(params.target_bits)
    if levels is None:
        return None
    if shared.quantization_type != "symmetric":
        raise RecipeError(
            f"DeepSpeed {where} -> target_bits={params.target_bits}: {levels} weights are "
            "symmetric only (DeepSpeed asserts it too); set quantization_type: symmetric"
        )
    moq = not shared.quantize_weight_in_forward
    if moq and params.start_bits != params.target_bits:
        raise RecipeError(
            f"DeepSpeed {where} -> start_bits={params.start_bits}: progressive bits down to "
            f"{levels} weights are not supported (low_bit_weights holds one level set from "
            f"the start); set start_bits to target_bits={params.target_bits}"
        )
    if moq and shared.rounding != "nearest":
        raise RecipeError(
            f"DeepSpeed weight_quantization -> shared_parameters -> rounding="
            f"{shared.rounding}: {levels} weights round to nearest (DeepSpeed asserts it too)"
        )
    grouping = "one alpha for the whole weight"
    if shared.quantize_groups > 1:
        grouping = "alpha and threshold per output row"
        logger.warning(
            "DeepSpeed {}: quantize_groups={} with {} weights -> alpha and threshold per "
            "output row (DeepSpeed takes them per block of whole rows: the same values "
            "when quantize_groups equals a layer's rows, finer otherwise)",
            where,
            shared.quantize_groups,
            levels,
        )
    logger.info(
        "DeepSpeed {} -> target_bits={}: low_bit_weights={} ({}), stored as 2-bit codes",
        where,
        params.target_bits,
        levels,
        grouping,
    )
    return levels


def _blend_rate(shared: Any) -> float | None:
    """``weight_blend_rate`` for ``fp16_mixed_quantize`` (None: no blend)."""
    mixed = shared.fp16_mixed_quantize
    where = "DeepSpeed weight_quantization -> shared_parameters -> fp16_mixed_quantize"
    if not mixed.enabled:
        return None
    if shared.quantize_weight_in_forward:
        logger.warning(
            "{}: enabled, but quantize_weight_in_forward is true, where DeepSpeed quantizes "
            "the weights directly and never blends; no blend here either",
            where,
        )
        return None
    logger.info(
        "{}: enabled -> weight_blend_rate={} (the full-precision share of the forward weight "
        "falls by it per step, back to 1 at each bit drop)",
        where,
        mixed.quantize_change_ratio,
    )
    return float(mixed.quantize_change_ratio)


def _in_forward_rounding(shared: Any) -> str:
    """``rounding`` for the group: DeepSpeed's in-forward quantizers round to nearest."""
    where = "DeepSpeed weight_quantization -> shared_parameters"
    if not shared.quantize_weight_in_forward:
        logger.info(
            "{} -> quantize_weight_in_forward=false: DeepSpeed's MoQ path (progressive bits, "
            "rounding={}); weights fake-quantized in our forward",
            where,
            shared.rounding,
        )
        return str(shared.rounding)
    if shared.rounding == "stochastic":
        logger.warning(
            "{} -> rounding=stochastic: quantize_weight_in_forward is true, where DeepSpeed "
            "rounds to nearest in the forward and never reads rounding; rounding=nearest here",
            where,
        )
    logger.info(
        "{} -> quantize_weight_in_forward=true: weights quantized at target_bits in the "
        "forward from schedule_offset, no progressive bits, rounding=nearest (DeepSpeed's "
        "code skips its MoQ quantizer on this path)",
        where,
    )
    return "nearest"


def _progressive(shared: Any, params: Any, where: str) -> dict[str, Any]:
    """The progressive-bit fields of a weight group (none: fixed ``target_bits``)."""
    if params.start_bits == params.target_bits:
        return {}
    if shared.quantize_weight_in_forward:
        logger.info(
            "DeepSpeed {} -> params: start_bits={} and quantization_period={} unused: "
            "quantize_weight_in_forward is true, so DeepSpeed quantizes at target_bits={} "
            "from the start; so do we",
            where,
            params.start_bits,
            params.quantization_period,
            params.target_bits,
        )
        return {}
    return {
        "start_bits": params.start_bits,
        "target_bits": params.target_bits,
        "quantization_period": params.quantization_period,
    }


def _activation_offset(
    act_offset: int, weight_offset: int, act_name: str, modules: list[str]
) -> int | None:
    """``activation_start`` for activations merged into a weight group (None: same start)."""
    if act_offset == weight_offset:
        return None
    if act_offset < weight_offset:
        raise RecipeError(
            f"DeepSpeed activation_quantization -> different_groups -> {act_name} -> "
            f"schedule_offset: {act_offset} is before weight quantization's {weight_offset} for "
            f"the same modules ({modules}); QuantizationModifier can start activations later "
            "than the weights (activation_start), not earlier: start both at the same "
            "schedule_offset or the activations later"
        )
    return act_offset


def _enabled_technique(config: DeepSpeedCompressionConfig, name: str) -> ParsedTechnique | None:
    return config.techniques.get(name) if name in config.enabled() else None


def _quantization(config: DeepSpeedCompressionConfig) -> list[Modifier]:
    """One QuantizationModifier per weight group, its layers' input activations quantized
    where an activation group names them too, then one for the layers only activation groups
    name (every layer of those groups when weights are not quantized)."""
    weights = _enabled_technique(config, "weight_quantization")
    acts = _enabled_technique(config, "activation_quantization")
    act_groups = _act_keys(acts)
    modifiers = []
    weight_keys: list[str] = []
    if weights is not None:
        modifiers += _weight_quantization(weights, acts, act_groups)
        weight_keys = [key for _, group in weights.groups.values() for key in group.modules]
    if acts is not None:
        modifiers += [
            _activation_quantization(acts.shared, name, params, keys, weight_keys)
            for name, (params, keys) in _activation_only(acts, act_groups, weight_keys).items()
        ]
    return modifiers


def _act_keys(acts: ParsedTechnique | None) -> dict[str, list[str]]:
    """Activation group name -> its ``modules`` keys."""
    if acts is None:
        return {}
    return {name: list(group.modules) for name, (_, group) in acts.groups.items()}


def _activation_only(
    acts: ParsedTechnique, act_groups: dict[str, list[str]], weight_keys: list[str]
) -> dict[str, tuple[Any, list[str]]]:
    """The activation groups' keys whose layers may carry no weight quantization: every key
    without weight quantization; with it, the keys that equal no weight key (a key equal to a
    weight key names the same layers, which the weight groups take)."""
    if "*" in weight_keys:
        return {}  # every layer has its weights quantized
    left = {}
    for name, (params, _) in acts.groups.items():
        keys = [key for key in act_groups[name] if key not in weight_keys]
        if keys:
            left[name] = (params, keys)
    return left


def _split_by_activations(
    keys: list[str], act_groups: dict[str, list[str]], weight_keys: list[str]
) -> dict[str | None, list[str]]:
    """The targets of a weight group, split by the activation group that also names their
    layers (None: no activation group does).

    DeepSpeed gives each layer at most one key of a technique (a layer two keys of one
    technique match is an error there), and matches a key anywhere in the name
    (``re.search``). So a weight key equal to an activation key names exactly that group's
    layers; an activation key equal to another weight key names none of this key's layers;
    the layers of any other activation key are found by matching both keys (a look-ahead).
    """
    split: dict[str | None, list[str]] = {}
    free = {
        name: [key for key in group if key not in weight_keys] for name, group in act_groups.items()
    }
    all_free = [key for group in free.values() for key in group]
    for key in keys:
        owner = next((name for name, group in act_groups.items() if key in group), None)
        if owner is not None or "*" in all_free:
            owner = owner or next(name for name, group in free.items() if "*" in group)
            split.setdefault(owner, []).extend(_targets([key]) or ["Linear"])
            continue
        for name, group in free.items():
            for act in group:
                both = f"re:(?=.*{act}).*{key}" if key != "*" else f"re:.*{act}"
                split.setdefault(name, []).append(both)
        if all_free and key != "*":
            alternatives = "|".join(all_free)
            split.setdefault(None, []).append(f"re:(?!.*(?:{alternatives})).*{key}")
        else:
            split.setdefault(None, []).extend(_targets([key]) or ["Linear"])
    return split


def _weight_quantization(
    weights: ParsedTechnique, acts: ParsedTechnique | None, act_groups: dict[str, list[str]]
) -> list[Modifier]:
    """One QuantizationModifier per weight group; a config group per activation group that
    shares its layers (named after the weight group when it is the only one).

    :param weights: the enabled weight_quantization technique
    :param acts: the enabled activation_quantization technique, if any
    :param act_groups: activation group name -> its ``modules`` keys
    """
    shared = weights.shared
    blend_rate = _blend_rate(shared)
    rounding = _in_forward_rounding(shared)
    _log_no_effect_keys(shared)
    weight_keys = [key for _, group in weights.groups.values() for key in group.modules]
    modifiers = []
    for name, (params, group) in weights.groups.items():
        where = f"weight_quantization -> different_groups -> {name}"
        levels = _low_bit_levels(shared, params, where)
        bits = params.target_bits if levels is None else 2
        scheme = _weight_scheme(shared, bits, group.modules, where)
        split = _split_by_activations(group.modules, act_groups, weight_keys)
        config_groups: dict[str, Any] = {}
        activation_start = None
        for act_name, targets in split.items():
            part = {**scheme, "targets": targets}
            if act_name is not None:
                assert acts is not None
                act_params, _ = acts.groups[act_name]
                part["input_activations"] = _activation_args(acts.shared, act_params.bits)
                activation_start = _activation_offset(
                    acts.shared.schedule_offset, shared.schedule_offset, act_name, group.modules
                )
                logger.info(
                    "DeepSpeed activation_quantization {} on the layers of {} it names too "
                    "({}): weights from step {}, activations from step {}",
                    act_name,
                    where,
                    targets,
                    shared.schedule_offset,
                    acts.shared.schedule_offset,
                )
            label = name if len(split) == 1 else f"{name}_{act_name or 'weights'}"
            config_groups[label] = part
        fields: dict[str, Any] = {
            "config_groups": config_groups,
            "start": shared.schedule_offset,
            "rounding": rounding,
        }
        if activation_start is not None:
            fields["activation_start"] = activation_start
        if blend_rate is not None:
            fields["weight_blend_rate"] = blend_rate
        if levels is not None:
            fields["low_bit_weights"] = levels
        else:
            fields.update(_progressive(shared, params, where))
        modifiers.append(_build("QuantizationModifier", where, **fields))
    return modifiers


def _log_no_effect_keys(shared: Any) -> None:
    for key in _NO_EFFECT:
        logger.info(
            "DeepSpeed weight_quantization -> {}={}: kernel/logging choice, no effect here "
            "(weights are fake-quantized in the forward)",
            key,
            getattr(shared, key),
        )


def _weight_scheme(shared: Any, bits: int, modules: list[str], where: str) -> dict[str, Any]:
    """The config group of a weight group: its targets and weight arguments."""
    scheme = {
        "targets": _targets(modules) or ["Linear"],
        "weights": _weight_args(shared, bits, shared.quantize_groups),
    }
    if shared.quantize_groups > 1:
        logger.info(
            "DeepSpeed {}: quantize_groups={} -> channel strategy (one scale per output "
            "row, never coarser than DeepSpeed's row blocks)",
            where,
            shared.quantize_groups,
        )
    return scheme


def _activation_quantization(
    shared: Any, name: str, params: Any, keys: list[str], weight_keys: list[str]
) -> Modifier:
    """The QuantizationModifier of an activation group's layers without weight quantization
    (``weight_keys``: the weight groups' keys, whose layers the weight modifiers take)."""
    where = f"activation_quantization -> different_groups -> {name}"
    scheme = {
        "targets": _targets(keys) or ["Linear"],
        "input_activations": _activation_args(shared, params.bits),
    }
    fields: dict[str, Any] = {"config_groups": {name: scheme}, "start": shared.schedule_offset}
    if weight_keys:
        fields["ignore"] = _targets(weight_keys)
    return _build("QuantizationModifier", where, **fields)


def _pruning(config: DeepSpeedCompressionConfig) -> list[Modifier]:
    modifiers = []
    for technique, kind in _PRUNING.items():
        parsed = _enabled_technique(config, technique)
        if parsed is None:
            continue
        if parsed.shared.method == "snip_momentum":
            modifiers.append(_snip_momentum(parsed))
            continue
        for name, (params, group) in parsed.groups.items():
            modifiers.append(_pruning_group(technique, kind, parsed.shared, name, params, group))
    return modifiers


def _snip_momentum(parsed: ParsedTechnique) -> Modifier:
    """``sparse_pruning`` with ``method: snip_momentum``: one SparsePruningModifier over the
    layers DeepSpeed's pruner takes, with DeepSpeed's defaults for the keys not given."""
    where = "sparse_pruning -> shared_parameters"
    shared = parsed.shared
    if parsed.groups:
        raise RecipeError(
            f"DeepSpeed sparse_pruning -> different_groups ({', '.join(parsed.groups)}): with "
            "method snip_momentum DeepSpeed prunes the whole model (less excluded_modules) "
            "and its layers refuse a snip_momentum group (NotImplementedError); leave "
            "different_groups empty"
        )
    start = shared.schedule_offset
    end = shared.schedule_offset_end if shared.schedule_offset_end is not None else start
    if end == 0:
        raise RecipeError(
            f"DeepSpeed {where} -> schedule_offset_end: 0; DeepSpeed's snip_momentum pruner "
            "needs a last pruning step after step 0 (it asserts end_step > 0): give "
            "schedule_offset_end of 1 or more"
        )
    fields: dict[str, Any] = {
        "method": "snip_momentum",
        "density": shared.dense_ratio if shared.dense_ratio is not None else 0.1,
        "block_pattern": shared.block_pattern if shared.block_pattern is not None else "4x1",
        "start": start,
        "end": end,
        "update": shared.schedule_offset_stride or 1,
    }
    if shared.excluded_modules:
        # DeepSpeed finds each key anywhere in a layer's name, as a regular expression
        fields["ignore"] = [f"re:.*(?:{key})" for key in shared.excluded_modules]
    return _build("SparsePruningModifier", "sparse_pruning", **fields)


def _pruning_group(
    technique: str, kind: str, shared: Any, name: str, params: Any, group: DeepSpeedGroup
) -> Modifier:
    """The pruning modifier (``kind``) of one group of ``technique``."""
    where = f"{technique} -> different_groups -> {name}"
    targets, related = _pruning_targets(technique, kind, group, where)
    fields: dict[str, Any] = {
        "targets": targets,
        "density": params.dense_ratio,
        "method": shared.method,
        "start": shared.schedule_offset,
    }
    if related is not None:
        fields["related_modules"] = related
    if technique == "sparse_pruning" and targets is not None:
        # DeepSpeed matches its keys against compressible layers only (Linear, Conv)
        fields["layers_only"] = True
    if shared.schedule_offset_end is None:
        fields["init_density"] = params.dense_ratio
    else:
        fields["end"] = shared.schedule_offset_end
    if technique == "head_pruning":
        fields["num_heads"] = shared.num_heads
    return _build(kind, where, **fields)


def _pruning_targets(
    technique: str, kind: str, group: DeepSpeedGroup, where: str
) -> tuple[list[str] | None, list[str] | None]:
    """``targets`` and ``related_modules`` of a pruning group (related: None when the group
    gives none). Head pruning names its unit by the first producer (q), not by the output
    projection DeepSpeed's ``modules`` names."""
    targets = _targets(group.modules)
    if technique == "head_pruning" and group.related_modules is None:
        raise RecipeError(
            f"DeepSpeed {where} -> related_modules: missing; DeepSpeed would then only "
            "mask the output projection's input columns, while HeadPruningModifier "
            "removes whole heads from q/k/v too; name the q/k/v projections there"
        )
    if group.related_modules is None:
        return targets, None
    if technique == "sparse_pruning":
        raise RecipeError(
            f"DeepSpeed {where} -> related_modules: unstructured sparsity removes "
            "no rows, so there is nothing to couple; remove related_modules"
        )
    related = [f"re:.*{key}" for keys in group.related_modules for key in keys]
    if technique == "head_pruning":
        targets = _targets(group.related_modules[0][:1])
        related += _targets(group.modules) or []  # the output projection
    logger.info(
        "DeepSpeed {} -> related_modules {}: checked at initialize against the "
        "coupling {} prunes by (used as the coupling where the architecture has "
        "none)",
        where,
        related,
        kind,
    )
    return targets, related


def _layer_reduction(config: DeepSpeedCompressionConfig) -> list[Modifier]:
    lr = config.layer_reduction
    if not lr.enabled:
        return []
    return [
        _build(
            "LayerReductionModifier",
            "layer_reduction",
            keep_number_layer=lr.keep_number_layer,
            teacher_layer=lr.teacher_layer,
            module_name_prefix=lr.module_name_prefix,
            other_module_name=lr.other_module_name,
        )
    ]


def deepspeed_modifiers(config: dict[str, Any] | str | Path) -> list[Modifier]:
    """Our modifiers for a DeepSpeed config (the mapping: ``docs/deepspeed.md``).

    :raises RecipeError: naming the technique, group and key that cannot be expressed
    """
    parsed = load_deepspeed_config(config)
    if not parsed.enabled():
        raise RecipeError("DeepSpeed compression_training: no technique is enabled")
    return _layer_reduction(parsed) + _pruning(parsed) + _quantization(parsed)

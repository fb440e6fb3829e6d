"""DeepSpeed ``compression_training`` -> our modifiers (``Recipe.from_deepspeed``).

Every key DeepSpeed reads either maps to a field of one of our modifiers or is rejected with a
``RecipeError`` naming the technique, the group and the key. Each resolved mapping is logged.

Choices (DeepSpeed 0.19.6 semantics):

- ``schedule_offset`` -> ``start`` and ``schedule_offset_end`` -> ``end``, in optimizer steps.
- ``modules``: DeepSpeed keeps the compressed layers whose name contains the key
  (``re.search``); compressed-tensors' ``re:`` uses ``re.match``, so each key becomes
  ``re:.*<key>``. ``["*"]`` (DeepSpeed's default) means every layer: targets are left unset
  (our default: every Linear, or the architecture's built-in coupling). A key that also names
  a container (``attention.self``) is fine for quantization (only Linear layers are
  quantized); sparse pruning rejects non-Linear targets at initialize, so name the Linear
  layers there.
- weight_quantization: one ``QuantizationModifier`` per group, int weights, ``symmetric``
  or ``asymmetric``, ``rounding`` as given; ``start_bits`` > ``target_bits`` turns on the
  progressive schedule of DeepSpeed's MoQ ``Quantizer`` (``runtime/quantize.py``): a bit
  drops each time its update count reaches ``quantization_period`` times 1, 2, 4, ...
  (absolute thresholds, see ``bit_drop_steps``). With ``schedule_offset`` 0 (the default)
  DeepSpeed makes one update before the first forward and our steps line up with its
  updates exactly; with a later offset its first update follows the optimizer step *at* the
  offset, so its forward of that step is still full precision and its bits and blend run one
  step behind ours (not mirrored: the activations, which DeepSpeed does start at the offset,
  would then start before the weights). ``quantization_period`` 0 (DeepSpeed: a drop at
  every update) cannot be expressed (a RecipeError).
  ``quantize_groups`` 1 is the ``tensor`` strategy; more than 1 is the ``channel`` strategy:
  DeepSpeed cuts the flattened weight into that many blocks of whole output rows, and one
  scale per row is never coarser than that, while compressed-tensors' ``group`` strategy
  splits the input dimension instead (a different partition). ``quantizer_kernel`` and
  ``quantize_verbose`` choose a CUDA kernel and logging only (logged, no effect).
  ``quantize_weight_in_forward``, as DeepSpeed's code reads it: false (the default) is the
  MoQ path, where the engine's ``Quantizer`` rewrites the weights after each optimizer step
  (progressive bits, blend, stochastic rounding); true skips that ``Quantizer`` altogether
  (the engine builds it only when the key is false) and the compressed layers quantize their
  weight in the forward at ``target_bits``, rounding to nearest (``compression/basic_layer.py``,
  ``compression/utils.py``). So true -> fixed ``target_bits`` weights from ``start``:
  ``start_bits`` and ``quantization_period`` are unused (logged when they would have made a
  schedule), ``rounding`` is ``nearest`` (a warning when the config asked for stochastic),
  and no blend. Both paths become fake-quantized weights in our forward.
  ``fp16_mixed_quantize`` enabled ->
  ``weight_blend_rate`` = ``quantize_change_ratio``: the forward weight blends full precision
  into the quantized one, the full-precision share falling by that much per step and reset to
  1 at each bit drop, as DeepSpeed's MoQ code does (see ``full_precision_share``). DeepSpeed
  blends only on its optimizer-step path: with ``quantize_weight_in_forward`` true it
  quantizes directly and never reads the blend, so neither do we (logged as a warning).
- activation_quantization: input activations of the same layers, ``bits``, symmetric or
  not, ``range_calibration`` dynamic (ranges from each batch, per tensor) or static (ranges
  observed while training, frozen at finalize). When weight quantization also runs, the
  activation group must name the same modules as a weight group and is merged into it (two
  modifiers cannot quantize one layer); otherwise a RecipeError. Its ``schedule_offset``
  becomes the modifier's ``activation_start`` when it is later than the weights' (DeepSpeed's
  defaults: weights at 0, activations at 1000): the weights are fake-quantized from
  ``start``, the activations from ``activation_start``. Activations starting *before* the
  weights of the same modules cannot be expressed (a RecipeError).
- sparse/row/head/channel pruning: one modifier per group, ``density`` = ``dense_ratio``,
  ``method`` l1 or topk. Without ``schedule_offset_end`` DeepSpeed applies the ratio at once:
  ``init_density`` = ``density``, masks kept until the end. With it, the density ramps from 1
  at ``start`` to ``dense_ratio`` at ``end`` (cubic), an end DeepSpeed's own l1/topk ignore.
- ``related_modules`` (structured pruning) -> the modifier's ``related_modules``
  (``re:.*<key>``): at initialize they are checked against the architecture's built-in
  mapping (``compressor.modifiers.pruning.mappings``), an error naming the modifier, its
  recipe group (``<technique>_<group>``) and the pattern when they disagree; for a model
  without a built-in mapping they define the coupling (rows, channels). Head pruning:
  DeepSpeed's ``modules`` names the output projection and ``related_modules`` q/k/v; our
  unit is named by its first producer, so targets come from the first related module (which
  head pruning therefore requires), and the related modules are q/k/v plus the output
  projection.
- Each DeepSpeed group becomes its own recipe group, ``<technique>_<group>`` (e.g.
  ``row_pruning_rp1``), so the YAML and errors at initialize point back to the config. ``num_heads`` is checked against
  the model's ``num_attention_heads`` at initialize. Sparse pruning has no coupling:
  ``related_modules`` there is an error.
- layer_reduction -> ``LayerReductionModifier`` with the same four fields, applied at
  initialize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loguru import logger
from pydantic import ValidationError

from compressor.modifiers.base import Modifier, get_modifier_class
from compressor.recipe.deepspeed.config import DeepSpeedCompressionConfig, load_deepspeed_config
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
    dynamic = shared.range_calibration == "dynamic"
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": shared.quantization_type == "symmetric",
        "strategy": "tensor",
        "dynamic": dynamic,
    }


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


def _quantization(config: DeepSpeedCompressionConfig) -> list[Modifier]:
    enabled = set(config.enabled())
    weights = config.techniques.get("weight_quantization")
    acts = config.techniques.get("activation_quantization")
    act_groups = (
        dict(acts.groups) if acts is not None and "activation_quantization" in enabled else {}
    )
    modifiers = []
    if weights is not None and "weight_quantization" in enabled:
        shared = weights.shared
        blend_rate = _blend_rate(shared)
        rounding = _in_forward_rounding(shared)
        for key in _NO_EFFECT:
            logger.info(
                "DeepSpeed weight_quantization -> {}={}: kernel/logging choice, no effect here "
                "(weights are fake-quantized in the forward)",
                key,
                getattr(shared, key),
            )
        for name, (params, group) in weights.groups.items():
            where = f"weight_quantization -> different_groups -> {name}"
            scheme: dict[str, Any] = {
                "targets": _targets(group.modules) or ["Linear"],
                "weights": _weight_args(shared, params.target_bits, shared.quantize_groups),
            }
            if shared.quantize_groups > 1:
                logger.info(
                    "DeepSpeed {}: quantize_groups={} -> channel strategy (one scale per output "
                    "row, never coarser than DeepSpeed's row blocks)",
                    where,
                    shared.quantize_groups,
                )
            activation_start = None
            for act_name, (act_params, act_group) in list(act_groups.items()):
                if act_group.modules != group.modules:
                    continue
                assert acts is not None
                activation_start = _activation_offset(
                    acts.shared.schedule_offset, shared.schedule_offset, act_name, group.modules
                )
                scheme["input_activations"] = _activation_args(acts.shared, act_params.bits)
                del act_groups[act_name]
                logger.info(
                    "DeepSpeed activation_quantization {} merged into {}: weights from step {}, "
                    "activations from step {}",
                    act_name,
                    where,
                    shared.schedule_offset,
                    acts.shared.schedule_offset,
                )
            fields: dict[str, Any] = {
                "config_groups": {name: scheme},
                "start": shared.schedule_offset,
                "rounding": rounding,
            }
            if activation_start is not None:
                fields["activation_start"] = activation_start
            if blend_rate is not None:
                fields["weight_blend_rate"] = blend_rate
            fields.update(_progressive(shared, params, where))
            modifiers.append(_build("QuantizationModifier", where, **fields))
        if act_groups:
            raise RecipeError(
                f"DeepSpeed activation_quantization -> different_groups -> {sorted(act_groups)} "
                "-> modules: weight quantization is enabled too, and no weight group names the "
                "same modules; two QuantizationModifiers cannot share layers, so give the "
                "activation group exactly the modules of a weight group"
            )
    for name, (params, group) in act_groups.items():
        where = f"activation_quantization -> different_groups -> {name}"
        shared = acts.shared  # type: ignore[union-attr]
        scheme = {
            "targets": _targets(group.modules) or ["Linear"],
            "input_activations": _activation_args(shared, params.bits),
        }
        modifiers.append(
            _build(
                "QuantizationModifier",
                where,
                config_groups={name: scheme},
                start=shared.schedule_offset,
            )
        )
    return modifiers


def _pruning(config: DeepSpeedCompressionConfig) -> list[Modifier]:
    modifiers = []
    enabled = set(config.enabled())
    for technique, kind in _PRUNING.items():
        if technique not in enabled:
            continue
        parsed = config.techniques[technique]
        shared = parsed.shared
        for name, (params, group) in parsed.groups.items():
            where = f"{technique} -> different_groups -> {name}"
            targets = _targets(group.modules)
            if technique == "head_pruning" and group.related_modules is None:
                raise RecipeError(
                    f"DeepSpeed {where} -> related_modules: missing; DeepSpeed would then only "
                    "mask the output projection's input columns, while HeadPruningModifier "
                    "removes whole heads from q/k/v too; name the q/k/v projections there"
                )
            if group.related_modules is not None:
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
            fields: dict[str, Any] = {
                "targets": targets,
                "density": params.dense_ratio,
                "method": shared.method,
                "start": shared.schedule_offset,
            }
            if group.related_modules is not None:
                fields["related_modules"] = related
            if shared.schedule_offset_end is None:
                fields["init_density"] = params.dense_ratio
            else:
                fields["end"] = shared.schedule_offset_end
            if technique == "head_pruning":
                fields["num_heads"] = shared.num_heads
            modifiers.append(_build(kind, where, **fields))
    return modifiers


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
    """Our modifiers for a DeepSpeed config (see the module docstring for the mapping).

    :raises RecipeError: naming the technique, group and key that cannot be expressed
    """
    parsed = load_deepspeed_config(config)
    if not parsed.enabled():
        raise RecipeError("DeepSpeed compression_training: no technique is enabled")
    return _layer_reduction(parsed) + _pruning(parsed) + _quantization(parsed)

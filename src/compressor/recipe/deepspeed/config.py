"""DeepSpeed ``compression_training`` configs, read with DeepSpeed's own keys and defaults.

The config has one block per technique, each with ``shared_parameters`` and
``different_groups`` (``params``, ``modules``, ``related_modules``). Parsing validates every
key at once and names the technique, the group and the key in its errors. Where DeepSpeed's
documentation and its code disagree, the code's default wins (DeepSpeed 0.19.6,
``deepspeed/compression/constants.py``): activation quantization and every pruning technique
start at ``schedule_offset`` 1000, and activation ranges are ``dynamic``. The resolved values
are logged so a user sees what runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compressor.recipe.errors import RecipeError
from compressor.recipe.limits import check_recipe_data, check_recipe_size
from compressor.utils.quote import quote

__all__ = [
    "DeepSpeedCompressionConfig",
    "DeepSpeedGroup",
    "load_deepspeed_config",
]

TECHNIQUES = (
    "weight_quantization",
    "activation_quantization",
    "sparse_pruning",
    "row_pruning",
    "head_pruning",
    "channel_pruning",
    "layer_reduction",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeepSpeedGroup(_Strict):
    """One entry of ``different_groups``: the parameters, the modules they apply to, and the
    modules coupled to them (the next layer whose inputs shrink with structured pruning)."""

    params: dict[str, Any] = Field(default_factory=dict)
    modules: list[str] = Field(default_factory=lambda: ["*"])
    related_modules: list[list[str]] | None = None

    @field_validator("modules", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class WeightQuantizationParams(_Strict):
    start_bits: int = Field(ge=1, le=32)
    target_bits: int = Field(ge=1, le=32)
    quantization_period: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _bits_decrease(self) -> WeightQuantizationParams:
        if self.target_bits > self.start_bits:
            raise ValueError(
                f"target_bits ({self.target_bits}) must not exceed start_bits ({self.start_bits})"
            )
        return self


class ActivationQuantizationParams(_Strict):
    bits: Literal[4, 8]


class DenseRatioParams(_Strict):
    dense_ratio: float = Field(gt=0, le=1)


class FP16MixedQuantize(_Strict):
    enabled: bool = False
    quantize_change_ratio: float = Field(default=0.001, gt=0, le=1)


class WeightQuantizationShared(_Strict):
    enabled: bool = False
    quantizer_kernel: bool = False
    schedule_offset: int = Field(default=0, ge=0)
    quantize_groups: int = Field(default=1, ge=1)
    quantize_verbose: bool = False
    quantization_type: Literal["symmetric", "asymmetric"] = "symmetric"
    quantize_weight_in_forward: bool = False
    rounding: Literal["nearest", "stochastic"] = "nearest"
    fp16_mixed_quantize: FP16MixedQuantize = Field(default_factory=FP16MixedQuantize)


class ActivationQuantizationShared(_Strict):
    enabled: bool = False
    quantization_type: Literal["symmetric", "asymmetric"] = "symmetric"
    range_calibration: Literal["dynamic", "static"] = "dynamic"
    schedule_offset: int = Field(default=1000, ge=0)


class PruningShared(_Strict):
    enabled: bool = False
    method: Literal["l1", "topk"] = "l1"
    schedule_offset: int = Field(default=1000, ge=0)
    schedule_offset_end: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _end_after_start(self) -> PruningShared:
        if self.schedule_offset_end is not None and self.schedule_offset_end < self.schedule_offset:
            raise ValueError(
                f"schedule_offset_end ({self.schedule_offset_end}) is before schedule_offset "
                f"({self.schedule_offset})"
            )
        return self


_SNIP_KEYS = ("block_pattern", "dense_ratio", "schedule_offset_stride", "excluded_modules")


class SparsePruningShared(PruningShared):
    """Sparse pruning's shared parameters. With ``method: snip_momentum`` DeepSpeed also
    reads ``block_pattern`` (default ``4x1``), ``dense_ratio`` (0.1), ``schedule_offset_stride``
    (1) and ``excluded_modules`` (none) here, and ``schedule_offset_end`` defaults to
    ``schedule_offset``; with another method it ignores those four, and so do we, with a log
    line."""

    method: Literal["l1", "topk", "snip_momentum"] = "l1"  # type: ignore[assignment]
    block_pattern: str | None = None
    dense_ratio: float | None = Field(default=None, gt=0, lt=1)
    schedule_offset_stride: int | None = Field(default=None, ge=1)
    excluded_modules: list[str] | None = None

    @model_validator(mode="after")
    def _snip_keys(self) -> SparsePruningShared:
        given = [k for k in _SNIP_KEYS if getattr(self, k) is not None]
        if given and self.method != "snip_momentum":
            logger.info(
                "DeepSpeed sparse_pruning -> shared_parameters -> {}: read only with method "
                "snip_momentum; with method {} DeepSpeed ignores them, so do we",
                given,
                self.method,
            )
        return self


class HeadPruningShared(PruningShared):
    method: Literal["l1", "topk"] = "topk"
    num_heads: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _heads_given(self) -> HeadPruningShared:
        if self.enabled and self.num_heads is None:
            raise ValueError("num_heads must be given when head pruning is enabled")
        return self


class Technique(_Strict):
    """A technique block; ``params`` of every group are validated by ``params_model``."""

    shared_parameters: dict[str, Any] = Field(default_factory=dict)
    different_groups: dict[str, DeepSpeedGroup] = Field(default_factory=dict)


class LayerReduction(_Strict):
    enabled: bool = False
    keep_number_layer: int | None = Field(default=None, ge=1)
    module_name_prefix: str | None = None
    teacher_layer: list[int] | None = None
    other_module_name: list[str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> LayerReduction:
        if not self.enabled:
            return self
        if self.teacher_layer is None:
            raise ValueError("teacher_layer must be given when layer reduction is enabled")
        if self.keep_number_layer is not None and self.keep_number_layer != len(self.teacher_layer):
            raise ValueError(
                f"keep_number_layer ({self.keep_number_layer}) differs from the number of "
                f"teacher_layer entries ({len(self.teacher_layer)})"
            )
        return self


_SHARED_MODELS: dict[str, type[BaseModel]] = {
    "weight_quantization": WeightQuantizationShared,
    "activation_quantization": ActivationQuantizationShared,
    "sparse_pruning": SparsePruningShared,
    "row_pruning": PruningShared,
    "head_pruning": HeadPruningShared,
    "channel_pruning": PruningShared,
}
_PARAMS_MODELS: dict[str, type[BaseModel]] = {
    "weight_quantization": WeightQuantizationParams,
    "activation_quantization": ActivationQuantizationParams,
    "sparse_pruning": DenseRatioParams,
    "row_pruning": DenseRatioParams,
    "head_pruning": DenseRatioParams,
    "channel_pruning": DenseRatioParams,
}


class ParsedTechnique(BaseModel):
    """A technique with its shared parameters and each group's parameters validated."""

    name: str
    shared: Any
    groups: dict[str, tuple[Any, DeepSpeedGroup]]


class DeepSpeedCompressionConfig(BaseModel):
    """The validated ``compression_training`` block, techniques in DeepSpeed's order."""

    techniques: dict[str, ParsedTechnique] = Field(default_factory=dict)
    layer_reduction: LayerReduction = Field(default_factory=LayerReduction)

    def enabled(self) -> list[str]:
        names = [n for n, t in self.techniques.items() if t.shared.enabled]
        return names + (["layer_reduction"] if self.layer_reduction.enabled else [])


def _error(where: str, err: ValidationError) -> RecipeError:
    lines = []
    for problem in err.errors():
        key = " -> ".join(str(p) for p in problem["loc"])
        target = f"{where} -> {key}" if key else where
        if problem["type"] == "extra_forbidden":
            lines.append(f"{target}: DeepSpeed does not read this key")
        elif problem["type"] == "missing":
            lines.append(f"{target}: required")
        else:
            lines.append(f"{target}: got {quote(problem.get('input'))}; {problem['msg'][:600]}")
    return RecipeError("invalid DeepSpeed compression config:\n  " + "\n  ".join(lines))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (``json`` would keep the last, silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RecipeError(
                f"duplicate key {quote(key, 60)} in a JSON object (beside "
                f"{', '.join(quote(k, 40) for k in list(out)[:5])}); each key may appear once"
            )
        out[key] = value
    return out


def load_deepspeed_config(config: dict[str, Any] | str | Path) -> DeepSpeedCompressionConfig:
    """Read a DeepSpeed config: a dict, or a JSON file path; either the whole DeepSpeed
    config holding ``compression_training`` or that block alone.

    :raises RecipeError: naming the technique, the group and the key
    """
    if isinstance(config, str | Path):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config not found: {path}")
        check_recipe_size(path.stat().st_size, str(path))
        try:
            config = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RecipeError(f"{path}: not valid JSON: {err}") from err
        except RecipeError as err:
            raise RecipeError(f"{path}: {err}") from None
    check_recipe_data(config)
    if not isinstance(config, dict):
        raise RecipeError(f"a DeepSpeed config must be a mapping, got {type(config).__name__}")
    if "compression_training" not in config and config and not set(config) & set(TECHNIQUES):
        raise RecipeError(
            "this DeepSpeed config has no compression_training section, and none of its keys "
            f"({', '.join(sorted(map(str, config)))}) is a technique DeepSpeed reads there: "
            f"{', '.join(TECHNIQUES)}"
        )
    block = config.get("compression_training", config)
    if not isinstance(block, dict):
        raise RecipeError("compression_training must be a mapping of techniques")
    unknown = sorted(set(block) - set(TECHNIQUES))
    if unknown:
        raise RecipeError(
            f"compression_training: unknown technique(s) {unknown}; DeepSpeed reads: "
            f"{', '.join(TECHNIQUES)}"
        )
    parsed = DeepSpeedCompressionConfig()
    for name in TECHNIQUES[:-1]:
        if name not in block:
            continue
        try:
            technique = Technique.model_validate(block[name])
        except ValidationError as err:
            raise _error(name, err) from None
        try:
            shared = _SHARED_MODELS[name].model_validate(technique.shared_parameters)
        except ValidationError as err:
            raise _error(f"{name} -> shared_parameters", err) from None
        snip = getattr(shared, "method", None) == "snip_momentum"  # DeepSpeed: groups optional
        if shared.enabled and not snip and not technique.different_groups:  # type: ignore[attr-defined]
            raise RecipeError(f"{name}: enabled, so different_groups must be given")
        groups = {}
        for group_name, group in technique.different_groups.items():
            try:
                params = _PARAMS_MODELS[name].model_validate(group.params)
            except ValidationError as err:
                raise _error(f"{name} -> different_groups -> {group_name} -> params", err) from None
            groups[group_name] = (params, group)
        parsed.techniques[name] = ParsedTechnique(name=name, shared=shared, groups=groups)
        if shared.enabled:  # type: ignore[attr-defined]
            logger.info("DeepSpeed {}: resolved shared parameters {}", name, shared.model_dump())
    if "layer_reduction" in block:
        try:
            parsed.layer_reduction = LayerReduction.model_validate(block["layer_reduction"])
        except ValidationError as err:
            raise _error("layer_reduction", err) from None
    return parsed

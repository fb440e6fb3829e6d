"""The quantization fields every quantizing modifier shares, and how they become a config.

``QuantizationSchemeMixin`` holds ``targets`` / ``ignore`` / ``scheme`` / ``config_groups``
and validates them when a recipe is parsed. ``resolve_quantization_config`` turns the fields
into a compressed-tensors ``QuantizationConfig``; ``compressor.modifiers.quantization.matching``
decides which module gets which of its schemes.
"""

from __future__ import annotations

from typing import Any

from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.quant_args import DynamicType
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from compressor.modifiers.quantization.kv_cache import check_kv_cache_args
from compressor.modifiers.quantization.observers import OBSERVER_KWARGS, make_observer
from compressor.utils.patterns import MatchPattern, check_match_pattern

__all__ = [
    "SUPPORTED_PRESETS",
    "QuantizationSchemeMixin",
    "check_args_supported",
    "resolve_quantization_config",
]

_WEIGHT_STRATEGIES = ("tensor", "channel", "group", "block", "tensor_group")
# static activation groups: compressed-tensors 0.20's forward quantizes activation groups
# with per-token scales only (dynamic), and fails on one fixed scale per group
_STATIC_ACTIVATION_STRATEGIES = ("tensor",)
_DYNAMIC_ACTIVATION_STRATEGIES = ("token", "tensor", "group")
_FLOAT_BITS = (4, 8)
# FP4 (E2M1) has no zero point and no per-tensor or per-row form in compressed-tensors:
# its scales are per group, under a global scale (NVFP4, tensor_group) or powers of two (MX)
_FP4_STRATEGIES = ("group", "tensor_group")
_INT_BITS = range(2, 9)


def check_args_supported(args: QuantizationArgs, role: str) -> None:
    """Raise ValueError when ``args`` asks for something this library cannot quantize.

    :param args: one set of quantization arguments
    :param role: ``weights``, ``input_activations`` or ``output_activations`` (for messages)
    """
    strategy = QuantizationStrategy(args.strategy).value
    if args.type == QuantizationType.FLOAT and args.num_bits not in _FLOAT_BITS:
        raise ValueError(
            f"{role}: float quantization with num_bits={args.num_bits} is not supported; "
            f"float num_bits must be one of {list(_FLOAT_BITS)}"
        )
    if args.type == QuantizationType.INT and args.num_bits not in _INT_BITS:
        raise ValueError(
            f"{role}: int quantization with num_bits={args.num_bits} is not supported; "
            f"int num_bits must be {_INT_BITS.start}..{_INT_BITS.stop - 1}"
        )
    if args.type == QuantizationType.FLOAT and args.num_bits == 4:
        if strategy not in _FP4_STRATEGIES:
            raise ValueError(
                f"{role}: FP4 with strategy {strategy!r} is not supported; FP4 takes one of "
                f"{list(_FP4_STRATEGIES)} (NVFP4: tensor_group, group_size 16; MXFP4: group, "
                "group_size 32)"
            )
        if not args.symmetric:
            raise ValueError(f"{role}: FP4 is symmetric only; set symmetric: true")
    if args.observer not in OBSERVER_KWARGS:
        raise ValueError(
            f"{role}: observer={args.observer!r} is not supported; use one of "
            f"{list(OBSERVER_KWARGS)}"
        )
    if role != "weights" and args.dynamic is not True:
        try:  # the observer's own arguments (observer_kwargs), checked up front
            make_observer(args, "minmax", 0.5)
        except ValueError as error:
            raise ValueError(f"{role}: {error}") from None
    if role == "weights":
        if args.observer == "moving_average":
            raise ValueError(
                f"{role}: observer='moving_average' is for activations; weights use their "
                "exact min and max"
            )
        if args.dynamic:
            raise ValueError(f"{role}: dynamic={args.dynamic!r} is for activations only")
        if strategy not in _WEIGHT_STRATEGIES:
            raise ValueError(
                f"{role}: strategy {strategy!r} is not supported; "
                f"weights take one of {list(_WEIGHT_STRATEGIES)}"
            )
        return
    if args.dynamic == DynamicType.LOCAL or strategy == "tensor_group":
        # NVFP4 activations: a static global scale observed in calibration, group scales
        # computed per forward under it; compressed-tensors' forward runs it on CPU
        if args.dynamic != DynamicType.LOCAL or strategy != "tensor_group":
            raise ValueError(
                f"{role}: dynamic={args.dynamic!r} with strategy {strategy!r} is not supported; "
                "dynamic 'local' goes with strategy 'tensor_group' (NVFP4 activations) and "
                "tensor_group activations need dynamic 'local'"
            )
        return
    allowed = _DYNAMIC_ACTIVATION_STRATEGIES if args.dynamic else _STATIC_ACTIVATION_STRATEGIES
    if strategy not in allowed:
        kind = "dynamic" if args.dynamic else "static"
        hint = (
            " (static activation ranges are per tensor; groups of activations need dynamic: true)"
            if strategy == "group" and not args.dynamic
            else ""
        )
        raise ValueError(
            f"{role}: strategy {strategy!r} is not supported for {kind} activations; "
            f"use one of {list(allowed)}{hint}"
        )


def _check_scheme(scheme: QuantizationScheme, where: str) -> None:
    roles = ("weights", "input_activations", "output_activations")
    if all(getattr(scheme, role) is None for role in roles):
        raise ValueError(f"{where}: quantizes nothing; give weights and/or activations")
    for role in roles:
        args = getattr(scheme, role)
        if args is not None:
            try:
                check_args_supported(args, role)
            except ValueError as err:
                raise ValueError(f"{where} -> {err}") from None


def _supported_presets() -> list[str]:
    names = []
    for name in PRESET_SCHEMES:
        try:
            _check_scheme(preset_name_to_scheme(name, ["Linear"]), name)
        except (ValueError, NotImplementedError):
            continue
        names.append(name)
    return names


SUPPORTED_PRESETS: list[str] = _supported_presets()


class QuantizationSchemeMixin(BaseModel):
    """Fields that say what to quantize and how, validated when a recipe is parsed.

    Mix into a modifier before ``Modifier``:
    ``class GPTQModifier(QuantizationSchemeMixin, Modifier)``.

    :param targets: modules to quantize: class names (``Linear``), module names, or
        ``re:`` patterns; also the default targets of config groups that give none
    :param ignore: modules to leave alone, in the same forms; none by default, as in
        llm-compressor: ``targets: [Linear]`` then quantizes ``lm_head`` too (tied to the input
        embeddings, it is untied first); write ``ignore: [lm_head]`` to keep it dense
    :param scheme: a compressed-tensors preset name (W4A16, W8A8, FP8_DYNAMIC, ...)
    :param config_groups: explicit compressed-tensors schemes by group name, each with
        ``weights`` / ``input_activations`` / ``output_activations`` arguments (and optional
        ``targets``); exclusive with ``scheme``. Where several groups' targets match a module,
        the most specific target decides its scheme (see ``scheme_for_module``)
    :param kv_cache_scheme: quantize the keys and values attention modules write to their
        cache (compressed-tensors' ``kv_cache_scheme``): 8-bit int or float, symmetric,
        static, ``strategy`` tensor or attn_head (one scale per key-value head); the scales
        are calibrated and saved as ``k_scale`` / ``v_scale`` on each attention module. With
        it, ``scheme`` and ``config_groups`` may both be left out (only the cache is
        quantized)
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    targets: list[MatchPattern] = ["Linear"]
    ignore: list[MatchPattern] = []
    scheme: str | None = None
    config_groups: dict[str, QuantizationScheme] | None = None
    kv_cache_scheme: QuantizationArgs | None = None

    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _one_string_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("scheme", mode="before")
    @classmethod
    def _upper_case_preset(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _groups_default_to_targets(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("config_groups"), dict):
            return data
        targets = data.get("targets", ["Linear"])
        targets = [targets] if isinstance(targets, str) else targets
        if not isinstance(targets, list):
            return data  # the targets field refuses it, naming it
        groups = {}
        for name, group in data["config_groups"].items():
            if isinstance(group, dict) and "targets" not in group:
                group = {**group, "targets": list(targets)}
            groups[name] = group
        return {**data, "config_groups": groups}

    @model_validator(mode="after")
    def _check_quantization_fields(self) -> QuantizationSchemeMixin:
        if not self.targets:
            raise ValueError("targets: empty; give at least one module class, name or re: pattern")
        if self.scheme is not None and self.config_groups is not None:
            raise ValueError(
                f"scheme={self.scheme!r} and config_groups are exclusive: give one of them"
            )
        if self.kv_cache_scheme is not None:
            check_kv_cache_args(self.kv_cache_scheme)
        if self.scheme is None and self.config_groups is None and self.kv_cache_scheme is None:
            raise ValueError(
                "give scheme (a preset: "
                + ", ".join(SUPPORTED_PRESETS)
                + "), config_groups or kv_cache_scheme"
            )
        if self.scheme is not None and self.scheme not in SUPPORTED_PRESETS:
            if self.scheme in PRESET_SCHEMES:
                try:
                    _check_scheme(preset_name_to_scheme(self.scheme, self.targets), "scheme")
                    reason = "not supported"
                except (ValueError, NotImplementedError) as err:
                    reason = str(err)
                raise ValueError(
                    f"scheme={self.scheme!r} is a compressed-tensors preset this library does "
                    f"not support ({reason}); supported presets: {', '.join(SUPPORTED_PRESETS)}"
                )
            raise ValueError(
                f"scheme={self.scheme!r} is not a known preset; "
                f"allowed: {', '.join(SUPPORTED_PRESETS)}"
            )
        for name, group in (self.config_groups or {}).items():
            if not group.targets:
                raise ValueError(f"config_groups -> {name} -> targets: empty")
            for position, target in enumerate(group.targets):
                try:
                    check_match_pattern(target)
                except ValueError as err:
                    raise ValueError(
                        f"config_groups -> {name} -> targets -> {position}: {err}"
                    ) from None
            _check_scheme(group, f"config_groups -> {name}")
        return self

    def resolve_quantization_config(self) -> QuantizationConfig:
        """The compressed-tensors config these fields describe."""
        return resolve_quantization_config(
            scheme=self.scheme,
            config_groups=self.config_groups
            if self.scheme is not None or self.config_groups is not None
            else {},
            targets=self.targets,
            ignore=self.ignore,
            kv_cache_scheme=self.kv_cache_scheme,
        )


def resolve_quantization_config(
    *,
    scheme: str | None = None,
    config_groups: dict[str, QuantizationScheme] | None = None,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    kv_cache_scheme: QuantizationArgs | None = None,
) -> QuantizationConfig:
    """Turn a preset name or explicit groups into a compressed-tensors QuantizationConfig.

    :param scheme: a preset name; exclusive with ``config_groups``
    :param config_groups: explicit schemes by group name (empty: only the cache is quantized)
    :param targets: the preset's targets (``Linear`` by default)
    :param ignore: modules to leave alone
    :param kv_cache_scheme: the key/value cache's quantization, if any
    """
    if (scheme is None) == (config_groups is None):
        raise ValueError("give exactly one of scheme and config_groups")
    if scheme is not None:
        groups = {"group_0": preset_name_to_scheme(scheme, list(targets or ["Linear"]))}
    else:
        assert config_groups is not None
        groups = {name: group.model_copy(deep=True) for name, group in config_groups.items()}
    kv = kv_cache_scheme.model_copy(deep=True) if kv_cache_scheme is not None else None
    return QuantizationConfig(config_groups=groups, ignore=list(ignore or []), kv_cache_scheme=kv)

"""Fields llm-compressor's modifiers accept that are bookkeeping here.

llm-compressor 0.14 writes every public field of its modifiers into the ``recipe.yaml`` beside
a checkpoint, so a recipe read from one carries fields such as ``requires_calibration_data``,
``bypass_divisibility_checks`` or ``batched_quantization``. Each field below is one that
llm-compressor's modifier class of that name accepts and ours has no field for. A value that
means nothing here (the default, or a setting that changes only memory use) is accepted and
logged once; a value that would change the result in llm-compressor and that we cannot honour
is refused with the reason. ``docs/llmcompressor-recipes.md`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from compressor.modifiers.base import Modifier

__all__ = [
    "LLMCOMPRESSOR_FIELDS",
    "LlmcompressorField",
    "check_llmcompressor_fields",
    "split_llmcompressor_fields",
]

_QUANTIZING = ("QuantizationModifier", "GPTQModifier")
_ANY = ("*",)
_logged: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class LlmcompressorField:
    """One llm-compressor field our modifier has no field for.

    :param name: the field's name in llm-compressor's modifier
    :param classes: the modifier classes (our names) that accept it there; ``*`` for every one
    :param without_effect: whether a value means nothing here (kept out of the modifier, logged)
    :param why: what the field does in llm-compressor and why it changes nothing here
    :param refused: why the other values are refused
    """

    name: str
    classes: tuple[str, ...]
    without_effect: Callable[[Any], bool]
    why: str
    refused: str

    def applies_to(self, modifier_cls: type[Modifier]) -> bool:
        return self.classes == _ANY or modifier_cls.__name__ in self.classes


def _is_none(value: Any) -> bool:
    return value is None


def _any_batching(value: Any) -> bool:
    return value is None or value == "auto" or (type(value) is int and value > 0)


LLMCOMPRESSOR_FIELDS: tuple[LlmcompressorField, ...] = (
    LlmcompressorField(
        "requires_calibration_data",
        _ANY,
        # checked against the built modifier in check_llmcompressor_fields
        lambda value: isinstance(value, bool),
        "llm-compressor records whether the modifier needs calibration data; ours says so "
        "from its fields",
        "it must be true or false, and equal what the modifier needs",
    ),
    LlmcompressorField(
        "bypass_divisibility_checks",
        _QUANTIZING,
        lambda value: value is False,
        "false keeps the check that weight columns divide into whole groups, which we make too",
        "true quantizes a last, partial group; here every group holds group_size columns, so "
        "such a layer must be left out with ignore, or quantized with another group_size",
    ),
    LlmcompressorField(
        "batched_quantization",
        ("GPTQModifier",),
        _any_batching,
        "it only bounds how many same-shape modules (MoE experts) GPTQ solves together, "
        "for memory; the result does not depend on it",
        "it must be 'auto', a positive integer or null",
    ),
    *(
        LlmcompressorField(
            name,
            _QUANTIZING,
            _is_none,
            "null: the scheme's own observer is used, as here",
            "overriding the scheme's observer by name is not supported; give the observer in "
            "config_groups (weights -> observer) instead",
        )
        for name in ("weight_observer", "input_observer", "output_observer")
    ),
    *(
        LlmcompressorField(
            name,
            ("OutputDistillationModifier",),
            lambda value: value in (None, {}, "identity", ["identity"]),
            "null / identity: the layer outputs are compared as they are, as here",
            "projections and transforms of the layer outputs before comparing them are not "
            "supported; leave it unset",
        )
        for name in (
            "projection",
            "projection_args",
            "transforms",
            "transforms_args",
            "comparison_args",
        )
    ),
    LlmcompressorField(
        "offload_layer_output",
        ("OutputDistillationModifier",),
        lambda value: isinstance(value, bool),
        "it only moves the captured layer outputs to the CPU, for memory",
        "it must be true or false",
    ),
)


def split_llmcompressor_fields(
    modifier_cls: type[Modifier], args: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Take llm-compressor's bookkeeping fields out of a modifier's recipe arguments.

    ``QuantizationModifier``'s ``observer`` is ours when it is a string; llm-compressor's
    form, a mapping of roles to observer names (or null), is taken out here.

    :returns: (the arguments for our modifier, the llm-compressor fields taken out)
    """
    ours = dict(args)
    theirs: dict[str, Any] = {}
    for spec in LLMCOMPRESSOR_FIELDS:
        if (
            spec.name in ours
            and spec.applies_to(modifier_cls)
            and spec.name not in _own(modifier_cls)
        ):
            theirs[spec.name] = ours.pop(spec.name)
    observer = ours.get("observer", "")
    if modifier_cls.__name__ in _QUANTIZING and (observer is None or isinstance(observer, dict)):
        theirs["observer"] = ours.pop("observer")
    return ours, theirs


def _own(modifier_cls: type[Modifier]) -> set[str]:
    return set(modifier_cls.model_fields)


def check_llmcompressor_fields(modifier: Modifier, fields: dict[str, Any], where: str) -> None:
    """Log the fields without effect (once per process and value), refuse the others.

    :param modifier: our modifier built from the rest of the arguments
    :param fields: what ``split_llmcompressor_fields`` took out
    :param where: the recipe path, for messages
    :raises ValueError: for a value that would change the result and that we cannot honour
    """
    specs = {spec.name: spec for spec in LLMCOMPRESSOR_FIELDS}
    name = type(modifier).__name__
    for field, value in fields.items():
        if field == "observer":
            if value:
                raise ValueError(
                    f"{where} -> observer: got {value!r}; llm-compressor's mapping of roles to "
                    "observer names is not supported: give a config group's own observer, or "
                    "the modifier's observer: minmax | moving_average for static activation ranges"
                )
            _log_once(name, field, value, "null: the scheme's own observers are used, as here")
            continue
        spec = specs[field]
        if not spec.without_effect(value):
            raise ValueError(f"{where} -> {field}: got {value!r}; {spec.refused}")
        if field == "requires_calibration_data":
            needs = modifier.requires_calibration_data()
            if value != needs:
                raise ValueError(
                    f"{where} -> requires_calibration_data: got {value!r}, but {name} with "
                    f"these fields {'needs' if needs else 'does not need'} calibration data; "
                    f"remove the field or set it to {str(needs).lower()}"
                )
        _log_once(name, field, value, spec.why)


def _log_once(modifier: str, field: str, value: Any, why: str) -> None:
    key = (modifier, field, repr(value))
    if key in _logged:
        return
    _logged.add(key)
    logger.info("{}: llm-compressor's {}={!r} has no effect here: {}", modifier, field, value, why)


_SCHEME_FIELDS = ("scheme", "config_groups", "targets", "ignore")


def wants_earlier_scheme(modifier_cls: type[Modifier], args: dict[str, Any]) -> bool:
    """Whether a GPTQModifier's arguments give no scheme: llm-compressor then applies GPTQ to
    the modules an earlier quantizing modifier gave a scheme to."""
    return (
        modifier_cls.__name__ == "GPTQModifier"
        and args.get("scheme") is None
        and args.get("config_groups") is None
    )


def gptq_args_from_earlier(
    earlier: Modifier | None, args: dict[str, Any], where: str
) -> dict[str, Any]:
    """GPTQ's arguments completed with the scheme of the ``QuantizationModifier`` before it.

    llm-compressor attaches that modifier's schemes at initialize, and a GPTQModifier with no
    scheme of its own quantizes with GPTQ every Linear that got one; the weights are then
    GPTQ's, and nothing is left for the earlier modifier to do that GPTQ does not (weights
    only, or dynamic activations). Here the two become one GPTQModifier with the earlier
    modifier's ``scheme`` / ``config_groups`` / ``targets`` / ``ignore``; the caller drops
    the earlier one. The result is what llm-compressor computes.

    :raises ValueError: when there is no such modifier, or when it does more than give a
        post-training scheme (a schedule, observers or training options)
    """
    if earlier is None or type(earlier).__name__ != "QuantizationModifier":
        raise ValueError(
            f"{where}: no scheme or config_groups, and no QuantizationModifier before it in the "
            "recipe whose scheme it could use (llm-compressor's meaning of a GPTQModifier "
            "without a scheme); give scheme or config_groups"
        )
    extra = sorted(set(earlier.recipe_args()) - set(_SCHEME_FIELDS))
    if extra:
        raise ValueError(
            f"{where}: no scheme of its own, so it would take over the QuantizationModifier "
            f"before it; that modifier also sets {extra}, which GPTQ does not do; give "
            "GPTQModifier its own scheme and keep the QuantizationModifier for the rest"
        )
    own_targets = args.get("targets")
    if own_targets not in (None, "Linear", ["Linear"]):
        raise ValueError(
            f"{where} -> targets: got {own_targets!r}; without a scheme GPTQ quantizes the "
            "Linears the QuantizationModifier before it targets, so give targets there"
        )
    merged = {k: v for k, v in args.items() if k not in ("targets", "scheme", "config_groups")}
    merged["targets"] = list(earlier.targets)  # type: ignore[attr-defined]
    merged["ignore"] = list(earlier.ignore) + [  # type: ignore[attr-defined]
        i
        for i in _as_list(args.get("ignore"))
        if i not in earlier.ignore  # type: ignore[attr-defined]
    ]
    if earlier.scheme is not None:  # type: ignore[attr-defined]
        merged["scheme"] = earlier.scheme  # type: ignore[attr-defined]
    else:
        merged["config_groups"] = {
            name: group.model_dump(mode="json", exclude_none=True)
            for name, group in earlier.config_groups.items()  # type: ignore[attr-defined]
        }
    logger.info(
        "{}: no scheme of its own; it quantizes with the scheme of the QuantizationModifier "
        "before it (as llm-compressor does), and the two run as one GPTQModifier",
        where,
    )
    return merged


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)

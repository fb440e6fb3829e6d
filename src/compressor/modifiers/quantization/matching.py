"""Which scheme each module gets, and attaching it.

``scheme_for_module`` answers which of a config's schemes a module gets: the one answer every
modifier, fit check and warning uses, with compressed-tensors' precedence (so it is also the
scheme compressed-tensors attaches and saves). ``match_quantizable_modules`` checks a config
against a model (targets that decide no module, group sizes that do not divide a layer) and
``apply_quantization`` attaches it (compressed-tensors' schemes, scales, quantized forward).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStrategy,
    apply_quantization_config,
)
from compressed_tensors.utils.match import is_match, match_targets
from loguru import logger

from compressor.utils.conv1d import conv1d_hint
from compressor.utils.embeddings import untie_word_embeddings

__all__ = [
    "QUANTIZABLE_MODULE_TYPES",
    "apply_quantization",
    "match_quantizable_modules",
    "scheme_for_module",
    "schemes_by_module",
]

# module types compressed-tensors can initialize, run quantized and compress
QUANTIZABLE_MODULE_TYPES: tuple[type[torch.nn.Module], ...] = (torch.nn.Linear, torch.nn.Embedding)


def _input_width(module: torch.nn.Module) -> int:
    """Columns of the weight as a matrix (a convolution's kernel is flattened)."""
    weight = module.weight
    return int(weight[0].numel()) if weight.dim() > 2 else int(weight.shape[-1])


def _check_module_fits(name: str, module: torch.nn.Module, scheme: QuantizationScheme) -> None:
    width = _input_width(module)
    label = f"{name} ({type(module).__name__}, input width {width})"
    for role in ("weights", "input_activations"):
        args = getattr(scheme, role)
        if args is None:
            continue
        if args.scale_dtype is not None and module.weight.dtype != torch.bfloat16:
            raise ValueError(
                f"{role}: the {args.num_bits}-bit float format with {args.scale_dtype} scales "
                f"(NVFP4 / MX) on {label} needs a bfloat16 model, and its weights are "
                f"{module.weight.dtype}: compressed-tensors decompresses these checkpoints to "
                "bfloat16, which a model of another dtype cannot run after saving or "
                "reloading. Load or cast the model in bfloat16 (model.to(torch.bfloat16))"
            )
        grouped = (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP)
        if args.strategy in grouped and width % args.group_size != 0:
            divisors = [g for g in (16, 32, 64, 128, 256) if width % g == 0]
            hint = (
                f"group sizes that divide it: {divisors}"
                if divisors
                else "no common group size divides it"
            )
            raise ValueError(
                f"{role}: group_size={args.group_size} does not divide the input width of "
                f"{label}; {hint}; or add the layer to ignore, or use strategy 'channel'"
            )
        if args.strategy == QuantizationStrategy.BLOCK:
            rows, cols = args.block_structure
            if width % cols != 0:
                raise ValueError(
                    f"{role}: block_structure={args.block_structure} columns do not divide the "
                    f"input width of {label}"
                )
    if isinstance(module, torch.nn.Conv2d) and (
        scheme.input_activations is not None or scheme.output_activations is not None
    ):
        raise ValueError(
            f"activations cannot be quantized for {label}: convolutions take weight "
            "quantization only; give it a weights-only config group"
        )
    if isinstance(module, torch.nn.Embedding) and scheme.input_activations is not None:
        raise ValueError(
            f"input_activations cannot be quantized for {label}: an Embedding's inputs are "
            "token ids; target embeddings with a weights-only group"
        )
    weights = scheme.weights
    if (
        isinstance(module, torch.nn.Embedding)
        and weights is not None
        and weights.type == "float"
        and weights.num_bits != 8
    ):
        # saved embeddings keep their ``weight`` (transformers initialises a missing one on
        # reload and fails), and compressed-tensors stores 4-bit floats only packed
        raise ValueError(
            f"weights: {weights.num_bits}-bit float weights (FP4 / MX) on {label} could not be "
            "reloaded: transformers reloads a quantized Embedding only from an unpacked "
            "format; give embeddings int weights (any bits) or 8-bit float weights, or add "
            "the embedding to ignore"
        )


def _schemes_by_target(config: QuantizationConfig) -> dict[str, QuantizationScheme]:
    """Each target's scheme. A target that several groups name takes the last group's, as in
    compressed-tensors' ``apply_quantization_config``, which builds this mapping the same way."""
    schemes: dict[str, QuantizationScheme] = {}
    for group in config.config_groups.values():
        assert isinstance(group, QuantizationScheme)
        for target in group.targets:
            schemes[target] = group
    return schemes


def _matching_targets(
    name: str, module: torch.nn.Module, schemes: dict[str, QuantizationScheme], ignore: list[str]
) -> list[str]:
    """The targets that match a module, the deciding one first (see ``scheme_for_module``);
    empty when ``ignore`` matches it."""
    if is_match(name, module, ignore):
        return []
    # compressed-tensors' own ordering, the one apply_quantization_config decides by
    return match_targets(name, module, schemes)


def scheme_for_module(
    name: str, module: torch.nn.Module, config: QuantizationConfig
) -> QuantizationScheme | None:
    """The scheme ``config`` gives a module, or None when it does not quantize it.

    Of the targets that match the module, the most specific decides, in compressed-tensors'
    precedence: an exact module name, then a ``re:`` pattern, then a class name; among
    targets of one kind, the alphabetically first (not the first in the config). ``ignore``
    wins over any target, even an exact name. This is what compressed-tensors attaches to a
    Linear or Embedding and saves; convolutions, which it does not hold, take the same answer.

    :param name: the module's name in the model
    :param module: the module
    :param config: the quantization config
    """
    schemes = _schemes_by_target(config)
    targets = _matching_targets(name, module, schemes, list(config.ignore or []))
    return schemes[targets[0]] if targets else None


def schemes_by_module(
    modules: dict[str, torch.nn.Module], config: QuantizationConfig
) -> dict[str, QuantizationScheme]:
    """``scheme_for_module`` of each module, for modules ``config`` quantizes (those of
    ``match_quantizable_modules``).

    :param modules: module name -> module
    :param config: the quantization config
    """
    schemes = {}
    for name, module in modules.items():
        scheme = scheme_for_module(name, module, config)
        if scheme is None:
            raise ValueError(f"{name}: no target of the quantization config selects it")
        schemes[name] = scheme
    return schemes


def match_quantizable_modules(
    model: torch.nn.Module,
    config: QuantizationConfig,
    module_types: tuple[type[torch.nn.Module], ...] = QUANTIZABLE_MODULE_TYPES,
) -> dict[str, torch.nn.Module]:
    """The modules ``config`` quantizes, after checking that it fits the model.

    Each module is checked against the scheme it gets (``scheme_for_module``). A target that
    decides no quantizable module's scheme logs a warning naming it (and the more specific
    targets that take the modules it matches, if any); a config that matches no module at
    all, a group size that does not divide a layer's input width, or activation quantization
    of an Embedding raise ValueError naming the layer.

    :param module_types: the module classes that may be quantized (add ``nn.Conv2d`` where
        the caller handles convolutions itself: compressed-tensors does not)
    :return: module name -> module, in model order
    """
    schemes = _schemes_by_target(config)
    ignore = list(config.ignore or [])
    matched: dict[str, torch.nn.Module] = {}
    decided = dict.fromkeys(schemes, 0)
    outranked_by: dict[str, set[str]] = {}
    unsupported: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        targets = _matching_targets(name, module, schemes, ignore)
        if not targets:
            continue
        if not isinstance(module, module_types):
            for target in targets:
                unsupported.setdefault(target, set()).add(type(module).__name__)
            continue
        deciding, *outranked = targets
        _check_module_fits(name, module, schemes[deciding])
        decided[deciding] += 1
        for target in outranked:
            outranked_by.setdefault(target, set()).add(deciding)
        matched[name] = module
    for target, count in decided.items():
        if count:
            continue
        if target in outranked_by:
            logger.warning(
                "quantization target {!r} decides no module's scheme: every quantizable module "
                "of {} it matches takes a more specific target's ({})",
                target,
                type(model).__name__,
                ", ".join(sorted(outranked_by[target])),
            )
            continue
        extra = ""
        if target in unsupported:
            extra = (
                f" (it matched only {', '.join(sorted(unsupported[target]))}, which cannot "
                "be quantized; target their Linear layers)"
            )
        logger.warning(
            "quantization target {!r} matches no quantizable module of {}{}",
            target,
            type(model).__name__,
            extra,
        )
    if not matched:
        raise ValueError(
            f"the quantization targets {list(schemes)} (ignoring {ignore}) match no "
            f"{' or '.join(t.__name__ for t in module_types)} module of {type(model).__name__}"
            f"{conv1d_hint(model)}"
        )
    return matched


class _DropUnmatchedTargetWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Could not match `")


@contextmanager
def _unmatched_target_warnings_dropped() -> Iterator[None]:
    """compressed-tensors warns about a target when no module has it as its first matching
    target in config order, so a more specific target that decides modules but comes later
    is called unmatched. ``match_quantizable_modules`` has already warned, by the deciding
    target, about every target that decides nothing; its warning is the one kept."""
    ct_logger = logging.getLogger("compressed_tensors.utils.match")
    dropped = _DropUnmatchedTargetWarnings()
    ct_logger.addFilter(dropped)
    try:
        yield
    finally:
        ct_logger.removeFilter(dropped)


def apply_quantization(
    model: torch.nn.Module,
    config: QuantizationConfig,
    modules: dict[str, torch.nn.Module] | None = None,
) -> dict[str, torch.nn.Module]:
    """Attach compressed-tensors quantization (scheme, scale parameters, quantized forward).

    Scales are left uninitialized: set them with ``update_weight_qparams`` and the
    activation observers. A ``kv_cache_scheme`` is not attached here (``KVCacheCalibration``). Returns the quantized modules by name. Each module's attached
    scheme is checked against ``scheme_for_module`` (RuntimeError if they differ), so that
    what is saved is what the modifiers quantized with.

    :param model: the model to change in place
    :param config: what to quantize
    :param modules: the modules to quantize (``match_quantizable_modules`` when None)
    """
    if modules is None:
        modules = match_quantizable_modules(model, config)
    _untie_quantized_embeddings(model, modules)
    # the key/value cache is attached by compressor.modifiers.quantization.kv_cache, which
    # hooks the attention forwards of the installed transformers (compressed-tensors 0.20's
    # own hook looks for an argument transformers 5.24 renamed)
    linear_config = config.model_copy(update={"kv_cache_scheme": None})
    with _unmatched_target_warnings_dropped():
        apply_quantization_config(
            model, linear_config, show_progress=False, allowed_modules=list(modules.values())
        )
    for name, module in modules.items():
        if not isinstance(module, QUANTIZABLE_MODULE_TYPES):
            continue  # convolutions: compressed-tensors holds no scheme for them
        attached = getattr(module, "quantization_scheme", None)
        expected = scheme_for_module(name, module, config)
        if attached != expected:
            # what is saved is the attached scheme: it must be the one the modifiers used
            raise RuntimeError(
                f"{name}: compressed-tensors attached the scheme {attached} but "
                f"scheme_for_module gives {expected}; the installed compressed-tensors "
                "decides schemes by another precedence than this library expects"
            )
    return modules


def _untie_quantized_embeddings(
    model: torch.nn.Module, modules: dict[str, torch.nn.Module]
) -> None:
    """A quantized output head (or input embedding) that shares its weight with the other one
    gets its own copy first, as llm-compressor does: the two are quantized differently (or one
    not at all), and a checkpoint whose head holds scales but no weight of its own does not
    reload."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return
    embedding, head = get_in(), get_out()
    chosen = {id(m) for m in modules.values()}
    if (
        head is not None
        and embedding is not None
        and (id(head) in chosen or id(embedding) in chosen)
    ):
        untie_word_embeddings(model, reason="one of them is quantized")

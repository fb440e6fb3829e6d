"""Per-channel scales moved between a module and the linears reading its output, the common
ground of SmoothQuant and AWQ: which modules a mapping pairs in a model, and the fold that
divides the smooth layer's output by a scale and multiplies the balance layers' input columns
by it, so the model computes the same function.

Pure functions; each writes weights with ``update_offload_parameter``, so that a module whose
weights are offloaded is updated where its weights live.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.quantization import QuantizationStatus
from compressed_tensors.utils import (
    get_lowest_common_ancestor_name,
    match_modules_set,
    match_named_modules,
)
from loguru import logger

from compressor.architectures import Feature, SmoothingMapping, architecture_for
from compressor.modifiers.transform.moe_smoothing import BlockReaders

__all__ = [
    "ResolvedSmoothing",
    "fold_smoothing_scales",
    "infer_smoothing_mappings",
    "quantized_forwards_off",
    "refresh_module_weight_qparams",
    "refresh_weight_qparams",
    "resolve_smoothing_mappings",
    "smoothed_width",
]


@dataclass
class ResolvedSmoothing:
    """One mapping in one place of a model: the smooth layer, its balance layers, and their
    lowest common ancestor (``parent``: the module whose output AWQ compares).

    ``routing`` are the routers (and shared-expert gates) of the sparse blocks whose input
    the balance layers read: their weight columns are multiplied by the scales as the balance
    layers' are, so the routing stays exact, but they are neither searched nor quantized.
    """

    smooth_name: str
    smooth: torch.nn.Module
    balance_names: list[str]
    balances: list[torch.nn.Linear]
    parent_name: str
    parent: torch.nn.Module
    routing_names: list[str] = field(default_factory=list)
    routing: list[torch.nn.Module] = field(default_factory=list)

    def modules(self) -> list[torch.nn.Module]:
        return [self.smooth, *self.balances]

    @property
    def reader(self) -> torch.nn.Module:
        """A module whose input is the smoothed activation of every token: the router of a
        sparse block (a routed expert's Linears may see only its own tokens), else the first
        balance layer."""
        return self.routing[0] if self.routing else self.balances[0]


def infer_smoothing_mappings(
    model: torch.nn.Module, feature: Feature, owner: str
) -> tuple[list[SmoothingMapping], float]:
    """The mappings of a known architecture, and the offset its norms scale by.

    :param feature: ``smoothquant`` or ``awq``
    :param owner: the modifier's name, for the error
    :raises ValueError: for other architectures, saying to pass ``mappings``
    """
    try:
        architecture = architecture_for(model, needs=feature)
    except ValueError as err:
        raise ValueError(
            f"{owner}: {err}. Pass `mappings` explicitly: a list of "
            "{smooth_layer: <module>, balance_layers: [<linears reading its output>]} or "
            "[[<balance linears>], <smooth module>], e.g. "
            '[[["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"], "re:.*input_layernorm$"]]'
        ) from None
    mappings = getattr(architecture, feature)
    return [m.model_copy(deep=True) for m in mappings], architecture.norm_weight_offset


def smoothed_width(smooth: torch.nn.Module, balance_width: int) -> int | None:
    """How many output channels of ``smooth`` a scale for ``balance_width`` inputs divides,
    or None when ``smooth`` does not write what the balance layers read.

    A norm: its width must equal theirs. A linear: its whole output, or the last third or half
    of a fused one (v of an ungrouped qkv, up of gate_up), as the fused layers order them.
    """
    weight = getattr(smooth, "weight", None)
    if isinstance(smooth, torch.nn.Linear):
        rows = smooth.out_features
        return (
            balance_width if rows in (balance_width, 2 * balance_width, 3 * balance_width) else None
        )
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return balance_width if weight.numel() == balance_width else None
    return None


def _mismatch(resolved: ResolvedSmoothing) -> str | None:
    widths = {
        name: m.in_features
        for name, m in zip(resolved.balance_names, resolved.balances, strict=True)
    }
    if len(set(widths.values())) != 1:
        return f"the balance layers read different widths {widths}"
    width = next(iter(widths.values()))
    if smoothed_width(resolved.smooth, width) is None:
        weight = getattr(resolved.smooth, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        return (
            f"{resolved.smooth_name} ({type(resolved.smooth).__name__}, weight {shape}) does not "
            f"write the {width} features {', '.join(resolved.balance_names)} read (grouped-query "
            "attention makes v_proj narrower than o_proj's input)"
        )
    return None


def resolve_smoothing_mappings(
    model: torch.nn.Module,
    mappings: Sequence[SmoothingMapping],
    ignore: Sequence[str],
    owner: str,
    inferred: bool,
) -> list[ResolvedSmoothing]:
    """Every place each mapping pairs a smooth layer with its balance layers.

    :param ignore: smooth layers not to smooth (match strings); skipped with a log line
    :param owner: the modifier's name, for messages
    :param inferred: whether the mappings are the architecture's defaults: then a place whose
        shapes do not fit (v_proj -> o_proj under grouped-query attention), or a mapping for
        modules this model lacks (DeepSeek's ``q_a_layernorm`` without a query low rank), is
        skipped with a log line; a mapping the user gave must match and fit everywhere
    :raises ValueError: a mapping that matches nothing, matches several smooth layers in one
        place, pairs non-linear balance layers, balances only some of the readers of a sparse
        block's input (``BlockReaders``), or (given by the user) does not fit the shapes
    """
    ignored = {name for name, _ in match_named_modules(model, list(ignore))} if ignore else set()
    names = {id(module): name for name, module in model.named_modules()}
    readers = BlockReaders(model)
    resolved: list[ResolvedSmoothing] = []
    skipped: list[str] = []
    for mapping in mappings:
        found = 0
        for smooths, *balance_sets in _matched(model, mapping, owner):
            found += 1
            if len(smooths) != 1:
                raise ValueError(
                    f"{owner}: mapping {_show(mapping)} matched {len(smooths)} smooth layers "
                    f"in one place ({[names[id(m)] for m in smooths]}); make smooth_layer match "
                    "one module per decoder layer"
                )
            smooth = smooths[0]
            if names[id(smooth)] in ignored:
                skipped.append(f"{names[id(smooth)]} (in ignore)")
                continue
            matched = [module for group in balance_sets for module in group]
            balance_names, balances, routing_names, routing = _balances(
                [names[id(module)] for module in matched], matched, readers, mapping, owner
            )
            parent_name = get_lowest_common_ancestor_name(balance_names)
            while isinstance(model.get_submodule(parent_name), torch.nn.ModuleList):
                parent_name = parent_name.rpartition(".")[0]
            item = ResolvedSmoothing(
                smooth_name=names[id(smooth)],
                smooth=smooth,
                balance_names=balance_names,
                balances=balances,
                parent_name=parent_name,
                parent=model.get_submodule(parent_name),
                routing_names=routing_names,
                routing=routing,
            )
            problem = _mismatch(item)
            if problem is not None:
                if not inferred:
                    raise ValueError(
                        f"{owner}: mapping {_show(mapping)} does not fit the model: {problem}; "
                        "remove this mapping or correct its patterns"
                    )
                skipped.append(f"{item.smooth_name} -> {', '.join(balance_names)} ({problem})")
                continue
            resolved.append(item)
        if not found and inferred:
            skipped.append(f"{_show(mapping)} (matches nothing in this model)")
        elif not found:
            raise ValueError(
                f"{owner}: mapping {_show(mapping)} matches nothing in {type(model).__name__}; "
                "pass `mappings` whose smooth_layer and balance_layers name this model's modules"
            )
    for line in skipped:
        logger.info("{}: not smoothed: {}", owner, line)
    if not resolved:
        raise ValueError(
            f"{owner}: no mapping is left to smooth in {type(model).__name__} "
            f"(skipped: {'; '.join(skipped)})"
        )
    return resolved


def _balances(
    names: list[str],
    matched: list[torch.nn.Module],
    readers: BlockReaders,
    mapping: SmoothingMapping,
    owner: str,
) -> tuple[list[str], list[torch.nn.Linear], list[str], list[torch.nn.Module]]:
    """The balance Linears of one place, and the routing modules scaled with them."""
    try:
        balance_names, modules, routing_names, routing = readers.split(
            names, matched, _show(mapping)
        )
    except ValueError as err:
        raise ValueError(f"{owner}: {err}") from None
    balances: list[torch.nn.Linear] = []
    for name, module in zip(balance_names, modules, strict=True):
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(
                f"{owner}: balance layer {name} of mapping {_show(mapping)} is a "
                f"{type(module).__name__}; balance layers must be Linear"
            )
        balances.append(module)
    return balance_names, balances, routing_names, routing


def _matched(
    model: torch.nn.Module, mapping: SmoothingMapping, owner: str
) -> Iterator[list[list[torch.nn.Module]]]:
    try:
        yield from match_modules_set(model, [mapping.smooth_layer, *mapping.balance_layers])
    except ValueError as err:
        raise ValueError(f"{owner}: mapping {_show(mapping)}: {err}") from None


def _show(mapping: SmoothingMapping) -> str:
    return f"{{smooth_layer: {mapping.smooth_layer!r}, balance_layers: {mapping.balance_layers}}}"


@torch.no_grad()
def fold_smoothing_scales(
    smooth: torch.nn.Module,
    balances: Sequence[torch.nn.Module],
    scales: torch.Tensor,
    norm_weight_offset: float = 0.0,
    precision: torch.dtype = torch.float64,
) -> None:
    """Divide ``smooth``'s output channels by ``scales`` and multiply the balance layers'
    input columns by them: ``W_b x == (W_b diag(s)) (x / s)``, so the function is unchanged.

    :param smooth: a norm with a 1-D scale (output ``(offset + weight) * normed``, and a bias
        if it has one) or a linear (its last ``len(scales)`` rows and bias entries)
    :param balances: the linears reading ``smooth``'s output (or modules with a Linear's
        ``[out, in]`` weight: a sparse block's router)
    :param scales: one positive scale per channel
    :param norm_weight_offset: ``offset`` above (Gemma's RMSNorm: 1)
    :param precision: dtype the products are computed in
    """
    width = scales.numel()
    for balance in balances:
        balance_weight = balance.weight
        assert isinstance(balance_weight, torch.Tensor)
        s = scales.to(balance_weight.device, precision)
        update_offload_parameter(
            balance, "weight", (balance_weight.to(precision) * s).to(balance_weight.dtype)
        )
    weight = smooth.weight
    assert isinstance(weight, torch.Tensor)
    s = scales.to(weight.device, precision)
    if isinstance(smooth, torch.nn.Linear):
        new = weight.to(precision).clone()
        new[-width:] /= s.unsqueeze(1)
        update_offload_parameter(smooth, "weight", new.to(weight.dtype))
    else:
        new = (weight.to(precision) + norm_weight_offset) / s - norm_weight_offset
        update_offload_parameter(smooth, "weight", new.to(weight.dtype))
    bias = getattr(smooth, "bias", None)
    if isinstance(bias, torch.Tensor):
        new_bias = bias.to(precision).clone()
        new_bias[-width:] /= s.to(bias.device)
        update_offload_parameter(smooth, "bias", new_bias.to(bias.dtype))


@contextlib.contextmanager
def quantized_forwards_off(root: torch.nn.Module) -> Iterator[None]:
    """Inside the block, the compressed-tensors quantized forward of every module under
    ``root`` is off (``quantization_enabled``), so the block computes in full precision;
    each module's own setting comes back after."""
    saved = [
        (module, getattr(module, "quantization_enabled", True))
        for module in root.modules()
        if hasattr(module, "quantization_scheme")
    ]
    for module, _ in saved:
        module.quantization_enabled = False  # type: ignore[assignment]
    try:
        yield
    finally:
        for module, enabled in saved:
            module.quantization_enabled = enabled  # type: ignore[assignment]


def refresh_weight_qparams(resolved: ResolvedSmoothing) -> None:
    """Set again, from the folded weights, the weight scales a quantizer attached earlier in
    the run (QuantizationModifier attaches them with scales of the weights at calibration
    start); frozen modules are left alone."""
    names = [resolved.smooth_name, *resolved.balance_names]
    for name, module in zip(names, resolved.modules(), strict=True):
        refresh_module_weight_qparams(name, module)


def refresh_module_weight_qparams(name: str, module: torch.nn.Module) -> None:
    """``refresh_weight_qparams`` for one module whose weights changed."""
    from compressor.modifiers.quantization.calibration import update_weight_qparams

    scheme = getattr(module, "quantization_scheme", None)
    frozen = getattr(module, "quantization_status", None) == QuantizationStatus.FROZEN
    attached = hasattr(module, "weight_scale")
    if scheme is not None and scheme.weights is not None and attached and not frozen:
        update_weight_qparams(module, name)

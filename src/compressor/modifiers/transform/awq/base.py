"""AWQModifier: per-channel scales searched so that the quantized weights lose the least."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch.utils._pytree import tree_map

from compressor.architectures import Feature
from compressor.core.events import Event, EventType
from compressor.core.state import State
from compressor.modifiers.base import Modifier
from compressor.modifiers.calibration_traits import CalibrationTraits
from compressor.modifiers.hooks import HooksMixin
from compressor.modifiers.quantization import QuantizationModifier
from compressor.modifiers.transform.awq.clipping import WeightClipping, clip_groups
from compressor.modifiers.transform.awq.search import (
    DuoScaling,
    awq_grid,
    candidate_scales,
    quantize_with_scales,
    weight_means,
)
from compressor.modifiers.transform.layerwise import LayerSmoothingModifier
from compressor.modifiers.transform.moe_smoothing import routed_only
from compressor.modifiers.transform.smoothing import ResolvedSmoothing, quantized_forwards_off
from compressor.utils import distributed

__all__ = ["AWQModifier"]

_Call = tuple[tuple[Any, ...], dict[str, Any]]


@Modifier.register("AWQ")
class AWQModifier(LayerSmoothingModifier):
    """Scale each smoothed channel by a factor searched on calibration activations, so that
    the weights of the channels that matter most lose the least to quantization; the scales
    fold into the previous module, and the model computes the same function until it is
    quantized.

    Paper: Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression
    and Acceleration" (arXiv:2306.00978). Semantics of llm-compressor 0.14: for each mapping,
    a grid of candidates ``s = mean|x| ** r / mean|W~| ** (1 - r)`` (``duo_scaling``; ``W~``
    normalised per quantization chunk), and the one whose fake-quantized balance weights
    ``Q(W s) / s`` give the smallest mean squared error of the balance layers' lowest common
    ancestor (the attention for q/k/v, the MLP for gate/up, o_proj and down_proj themselves)
    against its full-precision output wins (``awq.search``).

    The quantization grid is each balance layer's scheme: the one the quantization modifier
    after this one in the recipe attaches (QuantizationModifier for round to nearest with
    the searched scales, GPTQModifier to compose AWQ and GPTQ), or this modifier's own
    ``scheme``/``config_groups`` (llm-compressor's older AWQModifier form, which then
    quantizes to nearest itself).

    **Lifecycle**

    - ``on_initialize``: unfold fused experts into one Linear per expert; resolve the
      mappings (the architecture's when unset; v_proj -> o_proj is left out, with a log line,
      where grouped-query attention makes v narrower than o's input); errors name a mapping
      that matches nothing or does not fit
    - ``on_start`` (calibration start): hooks keep each parent module's inputs (on
      ``offload_device`` when set), each mapping's per-channel ``sum |x|`` (read where every
      token passes: a sparse block's router) and, with ``apply_clip``, the Gram matrix
      ``X^T X`` of each linear's inputs; with experts' up -> down mappings, every token also
      runs through every expert (``calibrate_all_experts``)
    - ``on_update`` at SEQUENTIAL_EPOCH_END: for the layer just calibrated, search each
      mapping's scales with every quantized forward off, fold them into the smooth layer
      (divided) and the balance layers (multiplied), and set the weight scales of an attached
      quantizer again; with ``apply_clip``, then clip the layer's linears (their input Gram
      matrices, gathered by the same hooks, divided by the folded scales); the pipelines run
      this before the quantizers calibrate the layer (``CalibrationTraits.transforms_first``)
    - ``on_end``: hooks removed; a mapping no calibration data reached is an error
    - ``finalize``: with its own scheme, the weights are quantized to nearest and frozen

    .. code-block:: yaml

        quant_stage:
          quant_modifiers:
            AWQModifier:
              duo_scaling: true
              mappings:
                - smooth_layer: re:.*input_layernorm$
                  balance_layers: [re:.*q_proj$, re:.*k_proj$, re:.*v_proj$]
                - smooth_layer: re:.*post_attention_layernorm$
                  balance_layers: [re:.*gate_proj$, re:.*up_proj$]
                - smooth_layer: re:.*up_proj$
                  balance_layers: [re:.*down_proj$]
            QuantizationModifier: {targets: [Linear], ignore: [lm_head], scheme: W4A16_ASYM}

    :param mappings: ``{smooth_layer, balance_layers}`` per mapping (or ``[[balance layers],
        smooth layer]``); the architecture's when unset
    :param duo_scaling: True: candidates from activation and weight means (plus the
        identity); False: activation means alone; ``both``: half the grid each way
    :param n_grid: how many candidates are searched per mapping
    :param apply_clip: after the scales, shrink each quantization chunk's weight range (every
        linear of the searched parent modules) to the factor in [0.55, 1] whose quantized
        weights change the layer's outputs on the calibration inputs the least: the paper's
        clipping search (AutoAWQ's ``apply_clip``; llm-compressor 0.14 has none, hence off by
        default). For rounding to nearest; GPTQ chooses its own rounding of the weights it is
        given, and clipping them first measured worse (bench/results/2026-12-01-awq-sq.md).
        Integer channel or group weights; other schemes are left unclipped with a log line
    :param offload_device: where the cached parent inputs wait for the search (``cpu``
        spares an accelerator's memory); unset: where they were computed
    :param targets: with ``scheme`` or ``config_groups``: what this modifier quantizes itself
    :param ignore: with ``scheme`` or ``config_groups``: what it leaves unquantized
    :param scheme: a preset (weights only or dynamic activations) this modifier quantizes to
        nearest with, after the search; unset: the next quantization modifier's scheme is used
    :param config_groups: explicit schemes instead of ``scheme``
    :param calibrate_all_experts: see ExpertCalibrationFields: each expert's up -> down
        search runs on every calibration token (off: on the tokens routed to it)
    :param min_expert_tokens: see ExpertCalibrationFields
    :param moe_mappings: see ExpertCalibrationFields
    """

    duo_scaling: DuoScaling = True
    n_grid: int = Field(default=20, ge=2)
    apply_clip: bool = False
    offload_device: str | None = None
    targets: list[str] | None = None
    ignore: list[str] | None = None
    scheme: str | None = None
    config_groups: dict[str, QuantizationScheme] | None = None

    _feature: ClassVar[Feature] = "awq"
    _quantizer: QuantizationModifier | None = PrivateAttr(default=None)
    _calls: dict[str, list[_Call]] = PrivateAttr(default_factory=dict)
    _sums: dict[str, list[torch.Tensor]] = PrivateAttr(default_factory=dict)
    _checked_schemes: bool = PrivateAttr(default=False)
    _clipping: WeightClipping | None = PrivateAttr(default=None)

    @field_validator("duo_scaling", mode="before")
    @classmethod
    def _duo(cls, value: Any) -> Any:
        if value not in (True, False, "both"):
            raise ValueError(f"duo_scaling={value!r} must be true, false or 'both'")
        return value

    @model_validator(mode="after")
    def _check_awq(self) -> AWQModifier:
        least = {True: 3, False: 2, "both": 4}[self.duo_scaling]
        if self.n_grid < least:
            raise ValueError(
                f"n_grid={self.n_grid} is too small for duo_scaling={self.duo_scaling!r}: "
                f"at least {least}"
            )
        own = self._own_quantizer()
        if own is None and (self.targets is not None or self.ignore is not None):
            raise ValueError(
                "targets and ignore say what AWQModifier quantizes itself, with scheme or "
                "config_groups; give one of those, or put targets/ignore on the quantization "
                "modifier that follows AWQModifier"
            )
        if own is not None:
            for name, group in own.resolve_quantization_config().config_groups.items():
                assert isinstance(group, QuantizationScheme)
                for role in ("input_activations", "output_activations"):
                    args = getattr(group, role)
                    if args is not None and not args.dynamic:
                        raise ValueError(
                            f"config group {name!r}: {role} are static; AWQModifier's own "
                            "scheme quantizes weights (and dynamic activations): put a "
                            "QuantizationModifier with this scheme after AWQModifier"
                        )
        if self.offload_device is not None:
            torch.device(self.offload_device)  # raises on a malformed device
        return self

    def _own_quantizer(self) -> QuantizationModifier | None:
        if self.scheme is None and self.config_groups is None:
            return None
        fields: dict[str, Any] = {"scheme": self.scheme, "config_groups": self.config_groups}
        if self.targets is not None:
            fields["targets"] = self.targets
        if self.ignore is not None:
            fields["ignore"] = self.ignore
        return QuantizationModifier(**fields)

    # ---------------------------------------------------------------- lifecycle
    def calibration_traits(self) -> CalibrationTraits:
        traits = super().calibration_traits()
        if self.apply_clip:
            # the clipping search's input Grams are this rank's alone: refused under a
            # process group rather than clipped differently on each rank
            traits = dataclasses.replace(traits, reduces_across_ranks=False)
        return traits

    def on_initialize(self, state: State) -> None:
        super().on_initialize(state)
        self._quantizer = self._own_quantizer()
        if self._quantizer is not None:
            self._quantizer.initialize(state)

    def on_start(self, state: State, event: Event) -> None:
        if self._quantizer is not None:  # attaches the schemes the search reads
            self._quantizer.update_event(state, event)
        if self.apply_clip:
            self._clipping = WeightClipping(clip_groups(self._resolved))
        super().on_start(state, event)
        if self._clipping is not None:  # the mappings' inputs are gathered by _observe
            for group in self._clipping.groups:
                if group.mapping is None:
                    self._observe_for_clipping(group.key, group.linears[0][1])

    def on_update(self, state: State, event: Event) -> None:
        super().on_update(state, event)
        if event.type_ != EventType.SEQUENTIAL_EPOCH_END:
            return
        if self._clipping is not None:
            inside = {id(m) for part in event.modules for m in part.modules()}
            self._clipping.clip_ready(inside, self._done)
        if self._quantizer is not None:
            self._quantizer.update_event(state, event)

    def on_end(self, state: State, event: Event) -> None:
        super().on_end(state, event)
        self._calls.clear()
        if self._clipping is not None:
            self._clipping.clip_ready(None, self._done)
            self._clipping = None
        if self._quantizer is not None and event.type_ == EventType.CALIBRATION_EPOCH_END:
            self._quantizer.update_event(state, event)

    def on_finalize(self, state: State) -> None:
        super().on_finalize(state)
        if self._quantizer is not None:
            self._quantizer.finalize(state)

    # ---------------------------------------------------------------- statistics
    def _experts_ignore(self) -> list[str]:
        return list(self.ignore or []) if self._own_quantizer() is not None else []

    def _statistics_modules(self, resolved: ResolvedSmoothing) -> list[torch.nn.Module]:
        return [resolved.reader, resolved.parent]

    def _observe(self, resolved: ResolvedSmoothing) -> None:
        if resolved.parent_name not in self._calls:
            calls: list[_Call] = []
            self._calls[resolved.parent_name] = calls
            device = torch.device(self.offload_device) if self.offload_device else None

            def keep_inputs(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                calls.append(_moved((args, kwargs), device))

            self.register_hook(resolved.parent, keep_inputs, "forward_pre", with_kwargs=True)
        width = resolved.balances[0].in_features
        sums = self._sums
        clipping = self._clipping

        def add_means(_module: torch.nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().reshape(-1, width)
            total = x.abs().sum(dim=0, dtype=torch.float64)
            if resolved.smooth_name in sums:
                sums[resolved.smooth_name][0] += total
                sums[resolved.smooth_name][1] += x.shape[0]
            else:
                sums[resolved.smooth_name] = [total, torch.tensor(x.shape[0], dtype=torch.float64)]
            if clipping is not None:
                clipping.add(resolved.smooth_name, x)

        # a sparse block's router reads every token; an expert's Linear may see only its own
        self.register_hook(resolved.reader, add_means, "forward_pre")

    def _observe_for_clipping(self, key: str, linear: torch.nn.Linear) -> None:
        clipping = self._clipping
        assert clipping is not None

        def add(_module: torch.nn.Module, inputs: tuple) -> None:
            clipping.add(key, inputs[0].reshape(-1, linear.in_features))

        self.register_hook(linear, add, "forward_pre")

    def _has_statistics(self, resolved: ResolvedSmoothing) -> bool:
        return resolved.smooth_name in self._sums

    def _fold(self, resolved: ResolvedSmoothing, scales: torch.Tensor) -> None:
        super()._fold(resolved, scales)
        if self._clipping is not None:
            self._clipping.rescale(resolved.smooth_name, scales)

    # ---------------------------------------------------------------- the search
    def _scales(self, resolved: ResolvedSmoothing) -> torch.Tensor | None:
        local_total, local_count = self._sums.pop(resolved.smooth_name, (None, None))
        width = resolved.balances[0].in_features
        device = resolved.balances[0].weight.device
        # the sums over every rank's data (a no-op in one process)
        total = distributed.reduce_optional(
            local_total, (width,), "sum", device=device, dtype=torch.float64
        )
        count = distributed.reduce_optional(
            local_count, (), "sum", device=device, dtype=torch.float64
        )
        assert total is not None and count is not None  # some rank observed it
        self._check_schemes()
        quantized = [
            (name, balance, args)
            for name, balance in zip(resolved.balance_names, resolved.balances, strict=True)
            if (args := _weight_args(balance)) is not None
        ]
        try:
            if not quantized:
                logger.info(
                    "AWQModifier: {} not smoothed: none of {} has quantized weights",
                    resolved.smooth_name,
                    ", ".join(resolved.balance_names),
                )
                return None
            x_mean = (total / count).float()
            return self._search(resolved, x_mean, quantized)
        finally:
            pending = any(
                r.parent_name == resolved.parent_name
                and r.smooth_name != resolved.smooth_name
                and r.smooth_name in self._sums
                for r in self._resolved
            )
            if not pending:
                self._calls.pop(resolved.parent_name, None)

    def _check_schemes(self) -> None:
        """Once, at the first search: some balance layer must be quantized (by this modifier
        or a later one), and duo scaling needs row-wise weight scales."""
        if self._checked_schemes:
            return
        self._checked_schemes = True
        schemes = {
            name: getattr(module, "quantization_scheme", None)
            for r in self._resolved
            for name, module in zip(r.balance_names, r.balances, strict=True)
        }
        if all(s is None or s.weights is None for s in schemes.values()):
            raise ValueError(
                "AWQModifier searches scales for a quantization grid, but no balance layer has "
                "quantized weights: give AWQModifier a scheme, or put a QuantizationModifier "
                "or GPTQModifier after it in the recipe (targeting the balance layers)"
            )
        if self.duo_scaling is not False:
            for name, s in schemes.items():
                if s is not None and s.weights is not None and s.weights.strategy == "tensor":
                    raise ValueError(
                        f"AWQModifier: duo_scaling={self.duo_scaling!r} needs channel or group "
                        f"weight scales, but {name} is quantized per tensor; set "
                        "duo_scaling: false, or use a channel or group strategy"
                    )

    @torch.no_grad()
    def _search(
        self,
        resolved: ResolvedSmoothing,
        x_mean: torch.Tensor,
        quantized: list[tuple[str, torch.nn.Linear, QuantizationArgs]],
    ) -> torch.Tensor:
        parent = resolved.parent
        device = resolved.balances[0].weight.device
        calls = [_moved(call, device) for call in self._calls[resolved.parent_name]]
        x_mean = x_mean.to(device)
        w_mean = None
        if self.duo_scaling is not False:
            w_mean = weight_means([(m.weight, args) for _, m, args in quantized]).to(device)
        originals = [module.weight.data for _, module, _ in quantized]
        candidates: list[torch.Tensor] = []
        totals: list[tuple[float, int]] = []
        # the parent's output is all the search compares: experts run on their routed tokens
        with quantized_forwards_off(parent), HooksMixin.disable_hooks(), routed_only(parent):
            reference = [_output(parent(*args, **kwargs)) for args, kwargs in calls]
            try:
                for ratio, duo in awq_grid(self.n_grid, self.duo_scaling):
                    scales = candidate_scales(x_mean, w_mean, ratio, duo)
                    for (name, module, args), weight in zip(quantized, originals, strict=True):
                        module.weight.data = quantize_with_scales(weight, scales, args, name)
                    candidates.append(scales)
                    totals.append(_squared_error(parent, calls, reference))
            finally:
                for (_, module, _), weight in zip(quantized, originals, strict=True):
                    module.weight.data = weight
        best: tuple[float, torch.Tensor] | None = None
        errors = _mean_errors(totals, device)
        for error, scales in zip(errors, candidates, strict=True):
            if error < (best[0] if best is not None else float("inf")):
                best = (error, scales)
        first_error = errors[0] if errors else None
        if best is None:
            raise RuntimeError(
                f"AWQModifier: every candidate scale for {resolved.smooth_name} gave a NaN or "
                f"infinite output of {resolved.parent_name}; check the model and the data"
            )
        logger.debug(
            "AWQ {}: output error {:.4g} at identity, {:.4g} with the best scales",
            resolved.smooth_name,
            first_error,
            best[0],
        )
        return best[1]


def _weight_args(module: torch.nn.Module) -> QuantizationArgs | None:
    scheme = getattr(module, "quantization_scheme", None)
    return getattr(scheme, "weights", None)


def _moved(call: _Call, device: torch.device | None) -> _Call:
    if device is None:
        return call
    return tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, call)


def _output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


def _squared_error(
    parent: torch.nn.Module, calls: list[_Call], reference: list[torch.Tensor]
) -> tuple[float, int]:
    """The sum of squared differences from ``reference`` over this rank's calls, and how
    many values it covers."""
    total, count = 0.0, 0
    for (args, kwargs), expected in zip(calls, reference, strict=True):
        diff = _output(parent(*args, **kwargs)).float() - expected.float()
        total += float(diff.pow(2).sum())
        count += diff.numel()
    return total, count


def _mean_errors(totals: list[tuple[float, int]], device: torch.device) -> list[float]:
    """Each candidate's mean squared error; under a process group, over every rank's calls
    (one reduction for all candidates)."""
    if distributed.is_distributed():
        summed = torch.tensor(totals, dtype=torch.float64, device=device).reshape(-1, 2)
        distributed.all_reduce_(summed, "sum")
        totals = [(float(t), int(c)) for t, c in summed.tolist()]
    return [total / max(count, 1) for total, count in totals]

"""GPTQModifier: second-order weight quantization, one decoder layer at a time."""

from __future__ import annotations

from typing import Any, Literal

import torch
from compressed_tensors.offload import OffloadCache, update_offload_parameter
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStrategy,
)
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator

from compressor.core.events import Event, EventType
from compressor.core.state import State
from compressor.modifiers.base import CalibrationTraits, Modifier
from compressor.modifiers.moe import (
    ExpertCalibrationFields,
    ExpertCoverage,
    keep_routing_exact,
    prepare_experts,
)
from compressor.modifiers.quantization.calibration import (
    freeze_quantization,
    set_qparams,
    static_activation_roles,
)
from compressor.modifiers.quantization.calibration_forward import CalibrationForwards
from compressor.modifiers.quantization.gptq import (
    SharedHessians,
    gptq_quantize_weights,
    round_to_nearest,
)
from compressor.modifiers.quantization.gptq.ranks import reduce_hessians, solve_gptq_shared
from compressor.modifiers.quantization.kv_cache import KVCacheCalibration, match_kv_cache_modules
from compressor.modifiers.quantization.matching import (
    apply_quantization,
    match_quantizable_modules,
    schemes_by_module,
)
from compressor.modifiers.quantization.observers import (
    ActivationObservers,
    averages_over_batches,
    observe_activation,
)
from compressor.modifiers.quantization.scheme import QuantizationSchemeMixin
from compressor.utils.finite import check_finite_weights
from compressor.utils.memory import overwrite_all_

__all__ = ["GPTQModifier"]

# strategies whose scales are per output row, so rows of several weights can be stacked
_ROW_WISE = (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP)
_Group = list[tuple[str, torch.nn.Module]]
"""Linears solved as one GPTQ problem (one Hessian, rows stacked): ``_same_problem_groups``."""

_ACTORDER_ALIASES = {"none": None, "weight": "static", "static": "static", "group": "group"}


@Modifier.register("GPTQ")
class GPTQModifier(QuantizationSchemeMixin, ExpertCalibrationFields, Modifier):
    """Quantize weights with GPTQ: each Linear's columns in turn, with error feedback.

    GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
    Pre-trained Transformers") collects the Hessian ``2/n sum x x^T`` of every targeted
    Linear's inputs and quantizes its weight column by column, spreading each column's
    rounding error over the columns still to come (see ``gptq.py``). On the sequential
    pipeline, each decoder layer is calibrated on the outputs of the already quantized layers
    before it, and quantized as soon as it has seen all the calibration data.

    A weight that already has zeros (pruned before, e.g. to 2:4) keeps every one of them,
    exactly zero in memory and in the checkpoint: only the kept weights set the scales and
    are quantized, the pruned ones are set to zero in the column loop (``gptq.py``,
    ``gptq_quantize_weights``).

    The checkpoint format is compressed-tensors', the same as QuantizationModifier's: scales
    and zero points on the modules, written by ``compressor.save_compressed``. Input
    activations may be dynamic (computed at run time) or static: a static input range is
    observed, as QuantizationModifier's observers do, on the calibration inputs the Hessian
    hook already sees (each Linear's inputs on the layers quantized before it), and set when
    the Linear is quantized (the W8A8 static recipes of SmoothQuant). Output activations may
    only be dynamic.

    **Lifecycle**

    - ``on_initialize``: unfold fused mixture-of-experts weights into one Linear per expert
      (``compressor.modifiers.moe``; routers stay exact, unknown expert layouts are
      refused); resolve the scheme, match the targets
    - ``on_start`` (calibration start): a Hessian-accumulating forward pre-hook on each Linear
      (which also observes the input range, when the input activations are static); every
      token runs through every expert (``calibrate_all_experts``), each expert's tokens
      counted; with
      ``kv_cache_scheme``, the quantized key/value cache attached and its ranges observed
    - ``on_update`` at SEQUENTIAL_EPOCH_END: quantize the Linears of the layer just calibrated
      (``event.modules``) and free their Hessians; set their static input scales from the
      observed ranges; their weights now lie on the grid, so their quantized forward stays
      off (it would give the same weights back) unless they also quantize activations
    - ``on_end`` (calibration end): log the tokens per expert (warn for starved ones);
      quantize whatever is still pending (every Linear, on the
      basic pipeline); round to nearest, with a warning, any module that saw no data; set the
      key/value cache's scales; switch every quantized forward on
    - ``finalize``: hooks removed; the modules stay quantized (frozen)

    Under a process group (``oneshot`` under ``torchrun``), each rank calibrates on its share
    of the rows: the Hessians (with their token counts) and the static input ranges are
    reduced over the ranks before use, and the solves are shared out, their results broadcast
    (``gptq/ranks.py``; docs/distributed.md).

    **Cost.** Linears that read one tensor (q/k/v, gate/up) share one Hessian and compute
    its product ``x^T x`` once, upper triangle only (``SharedHessians``). At a layer's end,
    Linears with identical Hessians and row-wise scales are solved as one stacked weight. The
    Hessian hooks are forward pre-hooks and read nothing else, so the sequential pipeline
    may stop each calibration forward at the layer's last module
    (``calibration_traits().reads_outputs`` is False).

    :param block_size: columns per lazy-update block (128 in the paper)
    :param dampening_frac: fraction of the mean Hessian diagonal added to the diagonal before
        inversion, a finite number in [0, 1] (0.01 by default); raised automatically (with a warning) when the Hessian is not positive
        definite
    :param actorder: ``static`` (the default, as in llm-compressor) quantizes columns in order
        of decreasing Hessian diagonal with group scales fixed up front (same checkpoint
        format); ``none`` keeps the natural order
    :param true_sequential: on the sequential pipeline, quantize a Llama-style layer's
        Linears group by group in the order it calls them (q/k/v, o, gate/up, down), each
        group calibrated on the outputs of the groups already quantized, as the GPTQ authors'
        code and AutoGPTQ do by default; it also needs fewer matrix products than
        calibrating the layer whole and running it again
        (``compressor.calibration.pipelines.staged``). False calibrates every Linear of a
        layer on the unquantized layer, as llm-compressor does. Layers of another form are
        always calibrated whole
    :param calibrate_all_experts: see ExpertCalibrationFields
    :param min_expert_tokens: see ExpertCalibrationFields
    :param moe_mappings: see ExpertCalibrationFields
    """

    block_size: int = Field(default=128, ge=1)
    dampening_frac: float = Field(default=0.01, ge=0.0, le=1.0, allow_inf_nan=False)
    actorder: Literal["static", "group"] | None = "static"
    true_sequential: bool = True

    _config: QuantizationConfig | None = PrivateAttr(default=None)
    _modules: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _schemes: dict[str, QuantizationScheme] = PrivateAttr(default_factory=dict)
    _hessians: SharedHessians = PrivateAttr(default_factory=SharedHessians)
    # experts see the tokens routed to them, rows mixed: per-batch ranges need batches alone
    _routed_inputs: bool = PrivateAttr(default=False)
    _quantized: set[str] = PrivateAttr(default_factory=set)
    _kv_modules: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _kv_cache: KVCacheCalibration | None = PrivateAttr(default=None)
    _coverage: ExpertCoverage | None = PrivateAttr(default=None)
    _hessian_tokens: dict[str, int] = PrivateAttr(default_factory=dict)
    # the fast quantized forward of static int inputs while calibrating (compressed-tensors'
    # own after): the layer's later stages and re-run read the quantized Linears
    _forwards: CalibrationForwards = PrivateAttr(default_factory=CalibrationForwards)
    _input_observers: ActivationObservers = PrivateAttr(
        default_factory=lambda: ActivationObservers("minmax", 0.95, prefer_args=True)
    )

    @field_validator("actorder", mode="before")
    @classmethod
    def _normalise_actorder(cls, value: Any) -> Any:
        if isinstance(value, str):
            key = value.lower()
            if key not in _ACTORDER_ALIASES:
                raise ValueError(
                    f"actorder={value!r} is not one of none, static (alias weight), group"
                )
            return _ACTORDER_ALIASES[key]
        return value

    @model_validator(mode="after")
    def _check_gptq(self) -> GPTQModifier:
        for field in ("start", "end", "update"):
            if getattr(self, field) is not None:
                raise ValueError(
                    f"{field}={getattr(self, field)!r}: GPTQModifier runs only in post-training "
                    "calibration (oneshot); leave start, end and update unset"
                )
        if self.actorder == "group":
            raise ValueError(
                "actorder='group' forms groups in activation order, which needs a g_idx "
                "(column -> group) tensor in the checkpoint; compressed-tensors 0.20 removed "
                "g_idx from its format, so the result could not be saved or reloaded. Use "
                "actorder='static' (activation order, contiguous groups, same format)"
            )
        for name, scheme in self.resolve_quantization_config().config_groups.items():
            assert isinstance(scheme, QuantizationScheme)
            _check_scheme_for_gptq(name, scheme, self.actorder)
        return self

    # ---------------------------------------------------------------- lifecycle
    def requires_calibration_data(self) -> bool:
        return True

    def calibration_traits(self) -> CalibrationTraits:
        return CalibrationTraits(
            # weights, scales and zero points are written with update_offload_parameter
            supports_offloaded_models=True,
            # the Hessians need only each Linear's inputs (forward pre-hooks)
            reads_outputs=False,
            merges_batches=self._merges_batches(),
            in_stages=self.true_sequential,
            # Hessians and minmax input ranges (reduce_hessians, the observers); a moving
            # average of ranges depends on batch order and cannot be
            reduces_across_ranks=not averages_over_batches(
                self.resolve_quantization_config(), "minmax", prefer_args=True
            ),
        )

    def _merges_batches(self) -> bool:
        """A Hessian sums ``x x^T`` over tokens, however they are batched; but an activation
        quantized with one dynamic scale per forward (strategy tensor) would see other
        scales in the compressed layers' re-runs if batches were stacked."""
        for scheme in self.resolve_quantization_config().config_groups.values():
            assert isinstance(scheme, QuantizationScheme)
            for args in (scheme.input_activations, scheme.output_activations):
                if args is not None and args.dynamic and args.strategy == "tensor":
                    return False
        # a moving average of ranges (or the last batch's) takes each stacked batch on its
        # own (observers.observe_activation), which experts' routed tokens do not allow
        return not (
            self._routed_inputs
            and averages_over_batches(self.resolve_quantization_config(), "minmax", True)
        )

    def on_initialize(self, state: State) -> None:
        if state.model is None:
            raise ValueError("GPTQModifier needs a model in the state")
        config = self.resolve_quantization_config()
        experts = prepare_experts(
            state.model, list(config.ignore or []), "GPTQModifier", tuple(self.moe_mappings)
        )
        self._config = keep_routing_exact(config, experts.exact)
        self._routed_inputs = bool(experts.experts)
        if self._config.kv_cache_scheme is not None:
            self._kv_modules = match_kv_cache_modules(state.model)
        self._modules = match_quantizable_modules(state.model, self._config)
        self._schemes = schemes_by_module(self._modules, self._config)
        # every module, not only the matched ones: a NaN weight anywhere before a Linear
        # makes its Hessian NaN (weights offloaded to disk are checked at their turn)
        check_finite_weights(state.model.named_modules(), "GPTQModifier")
        logger.info("GPTQModifier will quantize {} module(s)", len(self._modules))

    def on_start(self, state: State, event: Event) -> None:
        self._attach(state)
        assert state.model is not None
        self._coverage = ExpertCoverage.started_for(self, state.model)
        for name, module in self._modules.items():
            if isinstance(module, torch.nn.Linear):
                self.register_hook(module, self._hessian_hook(name, module), "forward_pre")
        if self._config is not None and self._config.kv_cache_scheme is not None:
            # the cache's ranges, observed as the calibration batches pass (after the
            # layer's q/k/v projections, quantized or not yet, as the pipeline runs them)
            self._kv_cache = KVCacheCalibration(
                state.model,
                self._kv_modules,
                self._config.kv_cache_scheme,
                ActivationObservers("minmax", 0.95, prefer_args=True),
                hooks=self,
            )
            self._kv_cache.start()

    def _attach(self, state: State) -> None:
        assert self._config is not None
        apply_quantization(state.model, self._config, self._modules)
        self._forwards.install(self._modules.values())
        for module in self._modules.values():
            module.quantization_enabled = False  # calibrate on the unquantized weights

    def _hessian_hook(self, name: str, module: torch.nn.Module) -> Any:
        hessians = self._hessians
        args = static_activation_roles(module).get("input")
        observer = self._input_observers.add(name, "input", args) if args is not None else None
        where = f"{name} (input activations)"

        def hook(module: torch.nn.Module, inputs: tuple) -> None:
            hessians.observe(name, inputs[0])
            if observer is not None:
                assert args is not None
                observe_activation(observer, inputs[0], args, where)

        return hook

    def on_update(self, state: State, event: Event) -> None:
        if event.type_ != EventType.SEQUENTIAL_EPOCH_END:
            return
        inside = {id(m) for part in event.modules for m in part.modules()}
        calibrated = [name for name, module in self._modules.items() if id(module) in inside]
        self._quantize_calibrated(calibrated)

    @property
    def hessian_tokens(self) -> dict[str, int]:
        """The tokens each quantized Linear's Hessian was built from, by name."""
        return dict(self._hessian_tokens)

    def on_end(self, state: State, event: Event) -> None:
        if self._coverage is not None:
            self._coverage.end()
        self._quantize_calibrated([name for name in self._modules if name not in self._quantized])
        for name, module in self._modules.items():
            if name not in self._quantized:
                logger.warning(
                    "GPTQModifier: {} received no calibration data; rounding it to nearest",
                    name,
                )
                self._round_to_nearest(name, module)
        if self._kv_cache is not None:
            self._kv_cache.end()
        self.remove_hooks()
        self._hessians.clear()
        self._forwards.remove()
        for module in self._modules.values():
            module.quantization_enabled = True

    def _quantize_calibrated(self, names: list[str]) -> None:
        """Quantize those of ``names`` that have a Hessian: under a process group, the Hessian
        over every rank's data (``reduce_hessians``; ``names`` come from the model, alike on
        every rank), the solves shared out over the ranks."""
        calibrated = reduce_hessians(self._hessians, names, self._modules)
        pending = [(name, self._modules[name]) for name in calibrated]
        for bundle in self._lockstep_bundles(self._same_problem_groups(pending)):
            self._quantize_bundle(bundle)

    def on_finalize(self, state: State) -> None:
        if not self.started:  # never calibrated: round to nearest so the scales are valid
            self._attach(state)
            self.on_end(state, Event(type_=EventType.FINALIZE))
        for module in self._modules.values():
            freeze_quantization(module)

    # ---------------------------------------------------------------- quantization
    def _weight_args(self, name: str) -> QuantizationArgs | None:
        return self._schemes[name].weights

    def _same_problem_groups(self, pending: list[tuple[str, torch.nn.Module]]) -> list[_Group]:
        """Split ``pending`` into groups GPTQ can solve as one weight.

        GPTQ treats every output row alike, given the inverse Hessian: Linears with exactly
        the same Hessian (those reading the same inputs, like q/k/v) and the same row-wise
        weight quantization (channel or group strategy) are one problem with their rows
        stacked, solved with one inversion and one column loop instead of several.
        """
        groups: list[_Group] = []
        for name, module in pending:
            args = self._weight_args(name)
            for group in groups:
                first_name, first = group[0]
                if (
                    args is not None
                    and args.strategy in _ROW_WISE
                    and args == self._weight_args(first_name)
                    and module.weight.dtype == first.weight.dtype
                    and module.weight.shape[1] == first.weight.shape[1]
                    and self._hessians.same_set(name, first_name)
                ):
                    group.append((name, module))
                    break
            else:
                groups.append([(name, module)])
        return groups

    def _lockstep_bundles(self, groups: list[_Group]) -> list[list[_Group]]:
        """Bundle problems (``_same_problem_groups``) that GPTQ can solve in lockstep: the
        same weight quantization and the same number of columns (a decoder layer's q/k/v, o
        and gate/up problems), each with its own Hessian (``gptq_quantize_weights``).

        Solving together holds the bundle's weights in one working buffer: a bundle grows
        only while that stays within twice the largest single problem's, so the solve's
        memory stays bounded by what the largest problem needs.
        """

        def size(group: _Group) -> int:
            return sum(module.weight.numel() for _, module in group)

        budget = 2 * max((size(g) for g in groups), default=0)
        bundles: list[list[_Group]] = []
        for group in groups:
            args = self._weight_args(group[0][0])
            for bundle in bundles:
                first_name, first = bundle[0][0]
                if (
                    args is not None
                    and args == self._weight_args(first_name)
                    and group[0][1].weight.shape[1] == first.weight.shape[1]
                    and group[0][1].weight.device == first.weight.device
                    and sum(size(g) for g in bundle) + size(group) <= budget
                ):
                    bundle.append(group)
                    break
            else:
                bundles.append([group])
        return bundles

    def _quantize_bundle(self, bundle: list[_Group]) -> None:
        """Solve problems in lockstep: each a single Linear, or several sharing one Hessian
        with their rows stacked (``_same_problem_groups``); then write each module's share."""
        args = self._weight_args(bundle[0][0][0])
        if args is None:
            for group in bundle:
                for name, module in group:
                    self._finish(name, module)
            return
        problems, counts = [], []
        # the weights only: the scales attached for them are not computed yet
        pairs = (pair for group in bundle for pair in group)
        check_finite_weights(pairs, "GPTQModifier", attributes=("weight",))
        for group in bundle:
            hessian, count = self._hessians.pop([name for name, _ in group])
            self._hessian_tokens.update(dict.fromkeys((name for name, _ in group), count))
            problems.append(([module.weight.data for _, module in group], hessian))  # no copy
            counts.append(count)
        results = solve_gptq_shared(
            problems,
            args,
            lambda mine: gptq_quantize_weights(
                mine,
                args,
                block_size=self.block_size,
                dampening_frac=self.dampening_frac,
                actorder=self.actorder,
                overwrite_hessian=True,  # popped: its own, or a copy
            ),
        )
        del problems
        writes: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for group, result, count in zip(bundle, results, counts, strict=True):
            modules = [module for _, module in group]
            together = " (one problem)" if len(group) > 1 else ""
            names = ", ".join(name for name, _ in group)
            logger.debug("GPTQ {}{}: {} samples, error {:.4g}", names, together, count, result.loss)
            if len(group) == 1:  # per-tensor scales too: nothing to split
                parts: Any = [(result.weight, result.scale, result.zero_point)]
            else:  # row-wise scales (channel, group): each module takes its own rows
                rows = [m.weight.shape[0] for m in modules]
                parts = zip(
                    result.weight.split(rows),
                    result.scale.split(rows),
                    result.zero_point.split(rows),
                    strict=True,
                )
            writes += [(m, *part) for (_, m), part in zip(group, parts, strict=True)]
        self._write(writes)
        for group in bundle:
            for name, module in group:
                self._finish(name, module)

    def _round_to_nearest(self, name: str, module: torch.nn.Module) -> None:
        args = self._weight_args(name)
        if args is not None:
            self._write([(module, *round_to_nearest(module.weight.data, args))])
        self._finish(name, module)

    @staticmethod
    def _write(
        writes: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> None:
        """Store each ``(module, weight, scale, zero point)``; through
        ``update_offload_parameter``, so that an offloaded module's weights are updated where
        they live, not in a temporary copy. Weights in the modules' own memory are written
        over with ``overwrite_all_`` (no copy-on-write of a memory-mapped checkpoint)."""
        in_place = []
        for module, weight, scale, zero in writes:
            if isinstance(module._parameters, OffloadCache):
                # contiguous: a disk offload saves it as is
                contiguous = weight.to(module.weight.dtype).contiguous()
                update_offload_parameter(module, "weight", contiguous)
            else:
                in_place.append((module.weight.data, weight))
            update_offload_parameter(
                module, "weight_scale", scale.reshape(module.weight_scale.shape)
            )
            zero_param = getattr(module, "weight_zero_point", None)
            if zero_param is not None:
                zero = zero.reshape(zero_param.shape).to(zero_param.dtype)
                update_offload_parameter(module, "weight_zero_point", zero)
        overwrite_all_(in_place)

    def _finish(self, name: str, module: torch.nn.Module) -> None:
        """The module's weight now lies on its grid. Its quantized forward is switched on only
        if it also quantizes activations (dynamically): fake-quantizing a weight that is
        already quantized gives it back unchanged, so the sequential pipeline's re-run of the
        layer skips that cost; ``on_end`` switches every module on."""
        scheme = self._schemes[name]
        args = static_activation_roles(module).get("input")
        if args is not None:
            observer = self._input_observers.get(name, "input")
            if observer is not None:  # over every rank's batches (once: each Linear once)
                observer.reduce_across_ranks(device=module.weight.device)
            if observer is None or observer.batches == 0:
                raise RuntimeError(
                    f"GPTQModifier: {name} has static input activations but no calibration "
                    "input reached it, so its input scale is unknown; give calibration data "
                    "that reaches it, or make its input_activations dynamic"
                )
            set_qparams(module, "input", *observer.range, args, name)
        module.quantization_enabled = bool(scheme.input_activations or scheme.output_activations)
        self._quantized.add(name)


def _check_scheme_for_gptq(name: str, scheme: QuantizationScheme, actorder: str | None) -> None:
    """GPTQ quantizes weights; input activations may be static or dynamic, output activations
    only dynamic."""
    where = f"config group {name!r}"
    if scheme.weights is None:
        raise ValueError(f"{where}: GPTQModifier quantizes weights, but weights is not set")
    args = scheme.output_activations
    if args is not None and not args.dynamic:
        raise ValueError(
            f"{where}: output_activations are static (dynamic=False); GPTQModifier observes "
            "only the inputs of the Linears it quantizes: make them dynamic, or quantize them "
            "with QuantizationModifier"
        )
    if scheme.weights.strategy not in ("tensor", "channel", "group"):
        raise ValueError(
            f"{where}: weights strategy {scheme.weights.strategy!r} is not supported by GPTQ; "
            "use tensor, channel or group"
        )
    if scheme.weights.actorder is not None:
        raw = scheme.weights.actorder
        theirs = _ACTORDER_ALIASES.get(str(getattr(raw, "value", raw)).lower())
        if theirs != actorder:
            raise ValueError(
                f"{where}: weights.actorder={scheme.weights.actorder!r} differs from the "
                f"modifier's actorder={actorder!r}; set the modifier's actorder field only "
                "(none or static)"
            )

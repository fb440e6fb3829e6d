"""QuantizationModifier: weights and activations, post-training or training-aware."""

from __future__ import annotations

from typing import Any, Literal

import torch
from compressed_tensors.quantization import QuantizationConfig
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator
from torch.nn.utils import parametrize

from compressor.core.events import Event, EventType
from compressor.core.state import State
from compressor.modifiers.base import CalibrationTraits, Modifier
from compressor.modifiers.quantization.calibration import (
    bake_quantized_weight,
    freeze_quantization,
    set_qparams,
    static_activation_roles,
    update_weight_qparams,
)
from compressor.modifiers.quantization.fake_quant import (
    LowBitWeights,
    WeightFakeQuantizer,
    low_bit_weight,
)
from compressor.modifiers.quantization.observers import (
    ObserverKind,
    RangeObserver,
    activation_range,
    make_observer,
    qparams_from_range,
)
from compressor.modifiers.quantization.progressive import (
    bit_drop_steps,
    full_precision_share,
    progressive_bits,
)
from compressor.modifiers.quantization.scheme import (
    QUANTIZABLE_MODULE_TYPES,
    QuantizationSchemeMixin,
    apply_quantization,
    match_quantizable_modules,
)
from compressor.modifiers.quantization.training import (
    ActivationFakeQuantizer,
    check_training_options,
)
from compressor.utils.parametrize import register_parametrization, remove_parametrizations

__all__ = ["QuantizationModifier"]

_ROLES = {"input": "input_activations", "output": "output_activations"}


class _ParametrizationHandle:
    """Removes a weight parametrization, putting the original Parameter object back."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        self.module, self.name = module, name

    def remove(self) -> None:
        if parametrize.is_parametrized(self.module, self.name):
            remove_parametrizations(self.module, self.name, leave_parametrized=False)


@Modifier.register()
class QuantizationModifier(QuantizationSchemeMixin, Modifier):
    """Quantize weights and activations with compressed-tensors schemes.

    Post-training, observers collect activation ranges over calibration batches and the
    model ends in compressed-tensors' frozen state, ready for ``save_compressed``. With a
    ``start``, training batches see fake-quantized weights and activations with a
    straight-through gradient (quantization-aware training, Jacob et al., 2018,
    https://arxiv.org/abs/1712.05877).

    **Lifecycle**

    - ``on_initialize``: resolve the scheme, check it against the model (targets, group
      sizes); nothing changes yet
    - ``on_start`` on CALIBRATION_EPOCH_START (post-training): attach compressed-tensors
      quantization, set weight scales from the weights, observe static activation ranges
      with forward hooks
    - ``on_start`` on BATCH_START (training): fake-quantize weights (a parametrization) and
      activations (hooks), both with straight-through gradients; observers update ranges
    - ``on_update`` (training): lower the weight bits on the progressive schedule and the
      full-precision share of blended weights; on the BATCH_START that reaches
      ``activation_start``, begin fake-quantizing activations
    - ``on_end``: calibration: freeze the scales; training: stop updating activation
      ranges. Under DDP the static ranges are first reduced over every rank (min / max, or
      the mean for ``moving_average``), so every rank freezes and saves the same scales
    - ``on_finalize``: training (or never started, when no calibration is needed): remove
      the fake quantization, attach compressed-tensors quantization with scales from the
      final weights and observed ranges, frozen; from then on
      ``model.save_pretrained`` writes the compressed-tensors format

    :param targets: see QuantizationSchemeMixin
    :param ignore: see QuantizationSchemeMixin
    :param scheme: see QuantizationSchemeMixin
    :param config_groups: see QuantizationSchemeMixin
    :param observer: how static activation ranges accumulate: ``minmax`` (extremes) or
        ``moving_average`` (an explicit config group's own ``observer`` wins over it)
    :param momentum: weight of the running range in the moving average
    :param rounding: ``nearest``, or ``stochastic`` (training only) for weights
    :param start_bits: progressive bit reduction: weight bits when training starts
    :param target_bits: progressive bit reduction: final weight bits (the scheme's bits)
    :param quantization_period: progressive bit reduction: the weights lose a bit in the
        forward of steps ``period * 2**k - 1`` (k = 0, 1, ...) from ``start``, counting as
        DeepSpeed's MoQ code does (absolute, doubling thresholds); see ``bit_drop_steps``
    :param activation_start: training only: the step (or epoch, like ``start``) from which
        activations are fake-quantized, at or after ``start`` and before ``end``; until
        then inputs and outputs pass through unquantized and static ranges are not observed,
        while the weights are already fake-quantized from ``start`` (DeepSpeed's separate
        weight and activation ``schedule_offset``); unset: activations start with the
        weights
    :param weight_blend_rate: training only: blend full-precision into the fake-quantized
        weights, ``r * w + (1 - r) * quantized``, with the share ``r`` falling by this rate per
        optimizer step until 0 (DeepSpeed's ``fp16_mixed_quantize`` with its
        ``quantize_change_ratio``). As in DeepSpeed's code (not its docs, which only say the
        quantized share starts at the rate and rises to 1): the first quantized forward
        already sees ``r = 1 - rate``, and every progressive bit drop resets ``r`` to 1, from
        where it falls again; see ``full_precision_share``. Gradients reach ``w`` unchanged.
        Finalize always writes fully quantized weights (a warning says so if ``r`` had not
        reached 0)
    :param low_bit_weights: training only: ``ternary`` (``alpha * {-1, 0, 1}``) or
        ``binary`` (``alpha * {-1, 1}``) weights per output row, as in DeepSpeed's XTC; the
        config groups' weights must be int, 2 bits, symmetric, channel strategy (the
        checkpoint stores them as 2-bit codes with alpha as the scale)
    """

    observer: ObserverKind = "minmax"
    momentum: float = Field(default=0.95, gt=0.0, lt=1.0)
    rounding: Literal["nearest", "stochastic"] = "nearest"
    start_bits: int | None = Field(default=None, ge=2, le=16)
    target_bits: int | None = Field(default=None, ge=2, le=8)
    quantization_period: int | None = Field(default=None, ge=1)
    activation_start: float | None = None
    weight_blend_rate: float | None = Field(default=None, gt=0.0, le=1.0)
    low_bit_weights: LowBitWeights | None = None

    _config: QuantizationConfig | None = PrivateAttr(default=None)
    _modules: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _convs: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _observers: dict[tuple[str, str], RangeObserver] = PrivateAttr(default_factory=dict)
    _pathway: Literal["calibration", "training"] | None = PrivateAttr(default=None)
    _active_handles: list[Any] = PrivateAttr(default_factory=list)
    _quantizers: dict[str, WeightFakeQuantizer] = PrivateAttr(default_factory=dict)
    _start_step: int = PrivateAttr(default=0)
    _activation_quantizers: list[ActivationFakeQuantizer] = PrivateAttr(default_factory=list)
    _disabled_qdq: list[torch.nn.Module] = PrivateAttr(default_factory=list)
    _blend_share: float = PrivateAttr(default=0.0)

    @model_validator(mode="after")
    def _check_training_options(self) -> QuantizationModifier:
        check_training_options(
            config=self.resolve_quantization_config(),
            start=self.start,
            end=self.end,
            activation_start=self.activation_start,
            rounding=self.rounding,
            start_bits=self.start_bits,
            target_bits=self.target_bits,
            quantization_period=self.quantization_period,
            low_bit_weights=self.low_bit_weights,
            weight_blend_rate=self.weight_blend_rate,
        )
        return self

    # ---------------------------------------------------------------- calibration needs
    def requires_calibration_data(self) -> bool:
        """True when a scheme has static activation ranges to observe."""
        return self.resolve_quantization_config().requires_calibration_data()

    def calibration_traits(self) -> CalibrationTraits:
        """Offloaded models are supported: post-training scales and baked weights are written
        with update_offload_parameter (training-aware quantization does not run on offloaded
        models)."""
        return CalibrationTraits(supports_offloaded_models=True)

    @property
    def quantized_modules(self) -> dict[str, torch.nn.Module]:
        """The modules this modifier quantizes, by name (known after initialize)."""
        return dict(self._modules)

    # ---------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State) -> None:
        if state.model is None:
            raise ValueError("QuantizationModifier needs a model in the state")
        self._config = self.resolve_quantization_config()
        self._modules = match_quantizable_modules(
            state.model, self._config, (*QUANTIZABLE_MODULE_TYPES, torch.nn.Conv2d)
        )
        self._convs = {n: m for n, m in self._modules.items() if isinstance(m, torch.nn.Conv2d)}
        if self._convs:
            logger.info(
                "{}: {} convolution(s) get quantized weight values but stay dense in checkpoints "
                "(compressed-tensors has no convolution format)",
                type(self).__name__,
                len(self._convs),
            )
        logger.info("{} will quantize {} module(s)", type(self).__name__, len(self._modules))

    def on_start(self, state: State, event: Event) -> None:
        if event.type_ == EventType.CALIBRATION_EPOCH_START:
            self._pathway = "calibration"
            self._start_calibration(state)
        else:
            self._pathway = "training"
            self._start_step = event.global_step
            self._start_training()
            self._maybe_start_activations(event)

    def on_update(self, state: State, event: Event) -> None:
        steps_event = event.type_ in (EventType.BATCH_START, EventType.OPTIM_POST_STEP)
        if self._pathway == "training" and self.start_bits is not None and steps_event:
            self._set_progressive_bits(event.global_step - self._start_step)
        blend = self.weight_blend_rate is not None and event.type_ == EventType.BATCH_START
        if self._pathway == "training" and blend:
            self._set_blend(event.global_step - self._start_step)
        if self._pathway == "training" and event.type_ == EventType.BATCH_START:
            self._maybe_start_activations(event)

    def on_end(self, state: State, event: Event) -> None:
        if self._pathway == "calibration":
            self._end_calibration()
        else:
            self._reduce_observers()
            for quantizer in self._activation_quantizers:
                quantizer.frozen = True
            logger.info(
                "{}: activation ranges frozen at step {}", type(self).__name__, event.global_step
            )

    def on_finalize(self, state: State) -> None:
        if self._pathway != "calibration":
            self._finalize_weights_and_ranges(state)

    def _finalize_weights_and_ranges(self, state: State) -> None:
        if self._pathway is None and self.requires_calibration_data():
            raise RuntimeError(
                f"{type(self).__name__} has static activation ranges to observe but no "
                "calibration ran (no CALIBRATION_EPOCH_START): give calibration data, or "
                "use dynamic activations (for example scheme W8A8 or FP8_DYNAMIC)"
            )
        if self._blend_share > 0.0:
            logger.warning(
                "{}: the last forward still blended {:.3f} full-precision weight "
                "(weight_blend_rate had not brought it to 0); the finalized model holds the "
                "fully quantized weights",
                type(self).__name__,
                self._blend_share,
            )
        self._remove_active_handles()
        assert self._config is not None
        apply_quantization(state.model, self._config, self._modules)
        self._bake_convolutions()
        for name, module in self._ct_modules().items():
            self._final_weight_qparams(name, module)
            for base, args in static_activation_roles(module).items():
                observer = self._observers.get((name, base))
                if observer is None or observer.batches == 0:
                    late = (
                        f" (activations are quantized from activation_start={self.activation_start})"
                        if self.activation_start is not None
                        else ""
                    )
                    raise RuntimeError(
                        f"{name}: no training batch reached it to observe its {base} range{late}"
                    )
                set_qparams(module, base, *observer.range, args, name)
            freeze_quantization(module)
        logger.info(
            "{}: {} module(s) quantized and frozen", type(self).__name__, len(self._modules)
        )

    def _ct_modules(self) -> dict[str, torch.nn.Module]:
        """The modules compressed-tensors holds (all but convolutions)."""
        return {n: m for n, m in self._modules.items() if n not in self._convs}

    def _bake_convolutions(self) -> None:
        schemes = self._schemes_by_module()
        levels = self.low_bit_weights if self._pathway == "training" else None
        for name, module in self._convs.items():
            bake_quantized_weight(module, schemes[name].weights, name, levels)

    def _final_weight_qparams(self, name: str, module: torch.nn.Module) -> None:
        if self.low_bit_weights is None or self._pathway != "training":
            update_weight_qparams(module, name)
            return
        # the weight becomes its ternary / binary values; alpha is the scale of codes in
        # {-1, 0, 1}, which a 2-bit symmetric int grid holds exactly
        with torch.no_grad():
            values, alpha = low_bit_weight(module.weight, self.low_bit_weights)
            module.weight.copy_(values)
            module.weight_scale.copy_(alpha.clamp(min=torch.finfo(alpha.dtype).tiny))
            zero_point = getattr(module, "weight_zero_point", None)
            if zero_point is not None:
                zero_point.zero_()

    # ---------------------------------------------------------------- post-training
    def _start_calibration(self, state: State) -> None:
        assert self._config is not None
        apply_quantization(state.model, self._config, self._modules)
        for name, module in self._ct_modules().items():
            update_weight_qparams(module, name)
            roles = static_activation_roles(module)
            if "output" in roles:  # its scale is unknown until the first output is seen
                module.quantization_enabled = False
                self._disabled_qdq.append(module)
            for base, args in roles.items():
                self._observe(name, module, base, args, write_qparams=True)

    def _observe(
        self,
        name: str,
        module: torch.nn.Module,
        base: str,
        args: Any,
        write_qparams: bool,
    ) -> RangeObserver:
        observer = self._make_observer(args)
        self._observers[(name, base)] = observer

        def update(value: torch.Tensor) -> None:
            lo, hi = activation_range(value, args)
            if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                qparams_from_range(lo, hi, args, f"{name} ({base} activations)")  # raises
            observer.update(lo, hi)
            if write_qparams:
                set_qparams(module, base, *observer.range, args, name)

        if base == "input":

            def observe_input(_module: torch.nn.Module, inputs: tuple) -> None:
                update(inputs[0])

            self._active_handles.append(self.register_hook(module, observe_input, "forward_pre"))
        else:

            def observe_output(_module: torch.nn.Module, _inputs: tuple, output: Any) -> None:
                update(output)

            self._active_handles.append(self.register_hook(module, observe_output, "forward"))
        return observer

    def _reduce_observers(self) -> None:
        """Under DDP, every static activation range becomes the range over all ranks' data,
        the same on every rank (a no-op in one process). Runs once per range, when the
        ranges are final: at the end of calibration, and when training freezes them."""
        for (name, _base), observer in self._observers.items():
            weight = self._modules[name].weight
            assert isinstance(weight, torch.Tensor)
            observer.reduce_across_ranks(device=weight.device)

    def _make_observer(self, args: Any) -> RangeObserver:
        # a preset's own observer name is its default; the modifier's observer field wins
        return make_observer(args, self.observer, self.momentum, prefer_args=self.scheme is None)

    def _end_calibration(self) -> None:
        self._remove_active_handles()
        self._reduce_observers()
        unseen = [
            f"{name} ({base})" for (name, base), obs in self._observers.items() if obs.batches == 0
        ]
        if unseen:
            raise RuntimeError(
                "calibration ended but no batch reached these modules, so their static "
                f"activation ranges are unknown: {', '.join(unseen)}"
            )
        for (name, base), observer in self._observers.items():  # the reduced ranges
            module = self._modules[name]
            args = static_activation_roles(module)[base]
            set_qparams(module, base, *observer.range, args, name)
        for module in self._disabled_qdq:
            module.quantization_enabled = True
        self._disabled_qdq.clear()
        self._bake_convolutions()
        for module in self._ct_modules().values():
            freeze_quantization(module)
        logger.info(
            "{}: calibration done, {} module(s) frozen ({} activation range(s) observed)",
            type(self).__name__,
            len(self._modules),
            len(self._observers),
        )

    # ---------------------------------------------------------------- training
    def _start_training(self) -> None:
        assert self._config is not None
        schemes = self._schemes_by_module()
        for name, module in self._modules.items():
            scheme = schemes[name]
            if scheme.weights is not None:
                quantizer = WeightFakeQuantizer(
                    scheme.weights,
                    stochastic=self.rounding == "stochastic",
                    where=name,
                    levels=self.low_bit_weights,
                )
                register_parametrization(module, "weight", quantizer, unsafe=True, where=name)
                self._active_handles.append(
                    self.track_handle(_ParametrizationHandle(module, "weight"))
                )  # type: ignore[arg-type]
                self._quantizers[name] = quantizer
            for base, role in _ROLES.items():
                args = getattr(scheme, role)
                if args is not None:
                    self._fake_quantize_activations(name, module, base, args)
        if self.start_bits is not None:
            self._set_progressive_bits(0)
        if self.weight_blend_rate is not None:
            self._set_blend(0)
        logger.info(
            "{}: quantization-aware training of {} module(s)",
            type(self).__name__,
            len(self._modules),
        )

    def _schemes_by_module(self) -> dict[str, Any]:
        """The scheme each module gets, by the first matching config group's targets."""
        from compressed_tensors.utils.match import is_match

        assert self._config is not None
        out = {}
        for name, module in self._modules.items():
            for group in self._config.config_groups.values():
                if any(is_match(name, module, target) for target in group.targets):  # type: ignore[union-attr]
                    out[name] = group
                    break
        return out

    def _fake_quantize_activations(
        self, name: str, module: torch.nn.Module, base: str, args: Any
    ) -> None:
        observer = None if args.dynamic else self._make_observer(args)
        if observer is not None:
            self._observers[(name, base)] = observer
        quantize = ActivationFakeQuantizer(args, observer, f"{name} ({base} activations)")
        quantize.active = self.activation_start is None  # else from activation_start on
        self._activation_quantizers.append(quantize)

        if base == "input":

            def quantize_input(_module: torch.nn.Module, inputs: tuple) -> tuple:
                return (quantize(inputs[0]), *inputs[1:])

            self._active_handles.append(self.register_hook(module, quantize_input, "forward_pre"))
        else:

            def quantize_output(_module: torch.nn.Module, _inputs: tuple, output: Any) -> Any:
                return quantize(output)

            self._active_handles.append(self.register_hook(module, quantize_output, "forward"))

    def _maybe_start_activations(self, event: Event) -> None:
        """Switch activation fake quantization on once ``activation_start`` is reached."""
        waiting = [q for q in self._activation_quantizers if not q.active]
        if not waiting or event.current_index < self.activation_start:  # type: ignore[operator]
            return
        for quantizer in waiting:
            quantizer.active = True
        logger.info(
            "{}: activations fake-quantized from step {} (activation_start={})",
            type(self).__name__,
            event.global_step,
            self.activation_start,
        )

    def _set_progressive_bits(self, steps: int) -> None:
        assert self.start_bits is not None and self.target_bits is not None
        assert self.quantization_period is not None
        bits = progressive_bits(steps, self.start_bits, self.target_bits, self.quantization_period)
        changed = [q for q in self._quantizers.values() if q.num_bits != bits]
        for quantizer in changed:
            quantizer.num_bits = bits
        if changed:
            logger.info("{}: weights now at {} bits (step {})", type(self).__name__, bits, steps)

    def _set_blend(self, steps: int) -> None:
        assert self.weight_blend_rate is not None
        drops = None
        if self.start_bits is not None:
            assert self.target_bits is not None and self.quantization_period is not None
            drops = bit_drop_steps(self.start_bits, self.target_bits, self.quantization_period)
        share = full_precision_share(steps, self.weight_blend_rate, drops)
        for quantizer in self._quantizers.values():
            quantizer.full_precision_share = share
        self._blend_share = share

    def _remove_active_handles(self) -> None:
        while self._active_handles:
            self._active_handles.pop().remove()
        self._quantizers.clear()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Training state for a resumed run: the step the bit schedule counts from, whether
        the activation ranges are frozen, and every observer's range."""
        return {
            "start_step": self._start_step,
            "ranges_frozen": any(q.frozen for q in self._activation_quantizers),
            "observers": {
                f"{name}|{base}": {"lo": obs.lo, "hi": obs.hi, "batches": obs.batches}
                for (name, base), obs in self._observers.items()
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()`` after the resumed run has started the modifier again."""
        self._start_step = int(state_dict.get("start_step", self._start_step))
        if state_dict.get("ranges_frozen", False):
            for quantizer in self._activation_quantizers:
                quantizer.frozen = True
        observers = {f"{name}|{base}": obs for (name, base), obs in self._observers.items()}
        unknown = sorted(set(state_dict.get("observers", {})) - set(observers))
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint has observers {unknown} that this run "
                "does not have (was it saved with another scheme or targets?)"
            )
        for key, saved in state_dict.get("observers", {}).items():
            observer = observers[key]
            observer.lo, observer.hi, observer.batches = saved["lo"], saved["hi"], saved["batches"]

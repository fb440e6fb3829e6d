"""Quantization-aware training: ``TrainingPathway``, QuantizationModifier's runtime while it
fake-quantizes a model in training, and its conversion to compressed-tensors at finalize."""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
)
from loguru import logger
from torch.nn.utils import parametrize

from compressor.core.events import Event, EventType
from compressor.modifiers.hooks import HooksMixin
from compressor.modifiers.quantization.calibration import (
    bake_convolutions,
    freeze_quantization,
    held_by_compressed_tensors,
    set_qparams,
    static_activation_roles,
    update_weight_qparams,
)
from compressor.modifiers.quantization.fake_quant import (
    ActivationFakeQuantizer,
    LowBitWeights,
    WeightFakeQuantizer,
    is_per_tensor,
    low_bit_weight,
)
from compressor.modifiers.quantization.fully_sharded import QuantizeOnForward
from compressor.modifiers.quantization.matching import apply_quantization
from compressor.modifiers.quantization.observers import ActivationObservers
from compressor.modifiers.quantization.progressive import (
    bit_drop_steps,
    full_precision_share,
    progressive_bits,
)
from compressor.modifiers.quantization.sharded import check_sharded_scheme
from compressor.utils.fsdp import is_fully_sharded_module
from compressor.utils.parametrize import register_parametrization, remove_parametrizations

__all__ = ["TrainingPathway"]

_ROLES = {"input": "input_activations", "output": "output_activations"}


class _ParametrizationHandle:
    """Removes a weight parametrization, putting the original Parameter object back."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        self.module, self.name = module, name

    def remove(self) -> None:
        if parametrize.is_parametrized(self.module, self.name):
            remove_parametrizations(self.module, self.name, leave_parametrized=False)


class TrainingPathway:
    """QuantizationModifier during training: weights fake-quantized through a
    parametrization (or, on weights FSDP2 manages, in their module's forward:
    ``fully_sharded.QuantizeOnForward``) and activations through hooks, both with
    straight-through gradients;
    at finalize, compressed-tensors quantization with scales from the final weights and the
    observed ranges, frozen.

    :param model: the model
    :param config: what to quantize
    :param modules: the modules to quantize, by name (convolutions included)
    :param schemes: each module's scheme (``schemes_by_module``)
    :param observers: where the static activation ranges accumulate
    :param hooks: registers the hooks and parametrizations (the modifier, which removes
        them all at finalize)
    :param owner: the modifier's name, for messages
    :param rounding: ``nearest`` or ``stochastic`` rounding of the weights
    :param low_bit_weights: ``ternary`` or ``binary`` weights instead of the schemes' grids
    :param start_bits: progressive bit reduction: the weight bits at the start (with
        ``target_bits`` and ``quantization_period``; see ``progressive_bits``)
    :param target_bits: progressive bit reduction: the final weight bits
    :param quantization_period: progressive bit reduction: steps before the first drop
    :param weight_blend_rate: how fast the full-precision share of the weights falls
        (``full_precision_share``); None: no blend
    :param activation_start: the step (or epoch) from which activations are fake-quantized;
        None: from the start
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: QuantizationConfig,
        modules: dict[str, torch.nn.Module],
        schemes: dict[str, QuantizationScheme],
        observers: ActivationObservers,
        hooks: HooksMixin,
        owner: str,
        *,
        rounding: str = "nearest",
        low_bit_weights: LowBitWeights | None = None,
        start_bits: int | None = None,
        target_bits: int | None = None,
        quantization_period: int | None = None,
        weight_blend_rate: float | None = None,
        activation_start: float | None = None,
    ) -> None:
        self.model, self.config, self.modules, self.schemes = model, config, modules, schemes
        self.observers, self.hooks, self.owner = observers, hooks, owner
        self.rounding, self.low_bit_weights = rounding, low_bit_weights
        self.start_bits, self.target_bits = start_bits, target_bits
        self.quantization_period = quantization_period
        self.weight_blend_rate, self.activation_start = weight_blend_rate, activation_start
        self.start_step = 0  # the optimizer step the schedules count from
        self._handles: list[Any] = []
        self._weight_quantizers: dict[str, WeightFakeQuantizer] = {}
        self._activation_quantizers: list[ActivationFakeQuantizer] = []
        self._blend_share = 0.0

    # ---------------------------------------------------------------- schedule
    def start(self, event: Event) -> None:
        """Fake-quantize every module's weights and activations from this step."""
        self.start_step = event.global_step
        for name, module in self.modules.items():  # tensor-parallel weights: refused first
            args = self.schemes[name].weights
            if args is not None and not is_fully_sharded_module(module):
                check_sharded_scheme(args, module.weight, name, self.low_bit_weights)
        for name, module in self.modules.items():
            scheme = self.schemes[name]
            if scheme.weights is not None:
                quantizer = WeightFakeQuantizer(
                    scheme.weights,
                    stochastic=self.rounding == "stochastic",
                    where=name,
                    levels=self.low_bit_weights,
                )
                handle = self._attach(name, module, quantizer)
                self._handles.append(self.hooks.track_handle(handle))  # type: ignore[arg-type]
                self._weight_quantizers[name] = quantizer
            for role, field in _ROLES.items():
                args = getattr(scheme, field)
                if args is not None:
                    self._fake_quantize_activations(name, module, role, args)
        if self.start_bits is not None:
            self._set_progressive_bits(0)
        if self.weight_blend_rate is not None:
            self._set_blend(0)
        logger.info(
            "{}: quantization-aware training of {} module(s)", self.owner, len(self.modules)
        )
        self._maybe_start_activations(event)

    @staticmethod
    def _attach(name: str, module: torch.nn.Module, quantizer: WeightFakeQuantizer) -> Any:
        """Fake-quantize ``module.weight`` from now on; a handle whose ``remove`` stops it.
        FSDP2 gathers a weight it manages only for its module's forward: quantized there
        (``QuantizeOnForward``); any other weight through a parametrization."""
        if is_fully_sharded_module(module):
            return QuantizeOnForward(module, quantizer, name)
        register_parametrization(module, "weight", quantizer, unsafe=True, where=name)
        return _ParametrizationHandle(module, "weight")

    def update(self, event: Event) -> None:
        """Lower the bits and the full-precision share on their schedules; switch activation
        fake quantization on at ``activation_start``."""
        steps_event = event.type_ in (EventType.BATCH_START, EventType.OPTIM_POST_STEP)
        if self.start_bits is not None and steps_event:
            self._set_progressive_bits(event.global_step - self.start_step)
        if self.weight_blend_rate is not None and event.type_ == EventType.BATCH_START:
            self._set_blend(event.global_step - self.start_step)
        if event.type_ == EventType.BATCH_START:
            self._maybe_start_activations(event)

    def end(self, event: Event) -> None:
        """Stop updating the activation ranges (reduced over DDP ranks first)."""
        self.observers.reduce_across_ranks(self.modules)
        self.freeze_ranges()
        logger.info("{}: activation ranges frozen at step {}", self.owner, event.global_step)

    def freeze_ranges(self) -> None:
        for quantizer in self._activation_quantizers:
            quantizer.frozen = True

    @property
    def ranges_frozen(self) -> bool:
        return any(q.frozen for q in self._activation_quantizers)

    def _fake_quantize_activations(
        self, name: str, module: torch.nn.Module, role: str, args: QuantizationArgs
    ) -> None:
        observer = None if args.dynamic else self.observers.add(name, role, args)
        quantize = ActivationFakeQuantizer(args, observer, f"{name} ({role} activations)")
        quantize.active = self.activation_start is None  # else from activation_start on
        self._activation_quantizers.append(quantize)

        if role == "input":

            def quantize_input(_module: torch.nn.Module, inputs: tuple) -> tuple:
                return (quantize(inputs[0]), *inputs[1:])

            self._handles.append(self.hooks.register_hook(module, quantize_input, "forward_pre"))
        else:

            def quantize_output(_module: torch.nn.Module, _inputs: tuple, output: Any) -> Any:
                return quantize(output)

            self._handles.append(self.hooks.register_hook(module, quantize_output, "forward"))

    def _maybe_start_activations(self, event: Event) -> None:
        """Switch activation fake quantization on once ``activation_start`` is reached."""
        waiting = [q for q in self._activation_quantizers if not q.active]
        if not waiting or event.current_index < self.activation_start:  # type: ignore[operator]
            return
        for quantizer in waiting:
            quantizer.active = True
        logger.info(
            "{}: activations fake-quantized from step {} (activation_start={})",
            self.owner,
            event.global_step,
            self.activation_start,
        )

    def _set_progressive_bits(self, steps: int) -> None:
        assert self.start_bits is not None and self.target_bits is not None
        assert self.quantization_period is not None
        bits = progressive_bits(steps, self.start_bits, self.target_bits, self.quantization_period)
        changed = [q for q in self._weight_quantizers.values() if q.num_bits != bits]
        for quantizer in changed:
            quantizer.num_bits = bits
        if changed:
            logger.info("{}: weights now at {} bits (step {})", self.owner, bits, steps)

    def _set_blend(self, steps: int) -> None:
        assert self.weight_blend_rate is not None
        drops = None
        if self.start_bits is not None:
            assert self.target_bits is not None and self.quantization_period is not None
            drops = bit_drop_steps(self.start_bits, self.target_bits, self.quantization_period)
        share = full_precision_share(steps, self.weight_blend_rate, drops)
        for quantizer in self._weight_quantizers.values():
            quantizer.full_precision_share = share
        self._blend_share = share

    # ---------------------------------------------------------------- finalize
    def finalize(self) -> None:
        """Remove the fake quantization; attach compressed-tensors quantization with scales
        from the final weights and the observed ranges, frozen."""
        if self._blend_share > 0.0:
            logger.warning(
                "{}: the last forward still blended {:.3f} full-precision weight "
                "(weight_blend_rate had not brought it to 0); the finalized model holds the "
                "fully quantized weights",
                self.owner,
                self._blend_share,
            )
        while self._handles:
            self._handles.pop().remove()
        self._weight_quantizers.clear()
        apply_quantization(self.model, self.config, self.modules)
        bake_convolutions(self.modules, self.schemes, self.low_bit_weights)
        for name, module in held_by_compressed_tensors(self.modules).items():
            self._final_weight_qparams(name, module)
            for role, args in static_activation_roles(module).items():
                observer = self.observers.get(name, role)
                if observer is None or observer.batches == 0:
                    late = (
                        f" (activations are quantized from activation_start={self.activation_start})"
                        if self.activation_start is not None
                        else ""
                    )
                    raise RuntimeError(
                        f"{name}: no training batch reached it to observe its {role} range{late}"
                    )
                set_qparams(module, role, *observer.range, args, name)
            freeze_quantization(module)
        logger.info("{}: {} module(s) quantized and frozen", self.owner, len(self.modules))

    def _final_weight_qparams(self, name: str, module: torch.nn.Module) -> None:
        if self.low_bit_weights is None:
            update_weight_qparams(module, name)
            return
        # the weight becomes its ternary / binary values; alpha is the scale of codes in
        # {-1, 0, 1}, which a 2-bit symmetric int grid holds exactly
        with torch.no_grad():
            args = self.schemes[name].weights
            assert args is not None
            values, alpha = low_bit_weight(module.weight, self.low_bit_weights, is_per_tensor(args))
            module.weight.copy_(values)
            scale: torch.Tensor = getattr(module, "weight_scale")  # noqa: B009 (typed)
            scale.copy_(alpha.clamp(min=torch.finfo(alpha.dtype).tiny).reshape(scale.shape))
            zero_point = getattr(module, "weight_zero_point", None)
            if zero_point is not None:
                zero_point.zero_()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The step the bit schedule counts from, whether the activation ranges are frozen,
        and every observed range."""
        return {
            "start_step": self.start_step,
            "ranges_frozen": self.ranges_frozen,
            "observers": self.observers.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_step = int(state_dict.get("start_step", self.start_step))
        if state_dict.get("ranges_frozen", False):
            self.freeze_ranges()
        self.observers.load_state_dict(state_dict.get("observers", {}))

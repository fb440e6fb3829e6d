"""QuantizationModifier: weights and activations, post-training or training-aware."""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator

from compressor.core.events import Event, EventType
from compressor.core.state import State
from compressor.modifiers.base import CalibrationTraits, Modifier
from compressor.modifiers.moe import (
    ExpertCalibrationFields,
    ExpertCoverage,
    keep_routing_exact,
    prepare_experts,
)
from compressor.modifiers.quantization.calibration import PostTrainingPathway
from compressor.modifiers.quantization.fake_quant import LowBitWeights
from compressor.modifiers.quantization.kv_cache import KVCacheCalibration, match_kv_cache_modules
from compressor.modifiers.quantization.matching import (
    QUANTIZABLE_MODULE_TYPES,
    match_quantizable_modules,
    schemes_by_module,
)
from compressor.modifiers.quantization.observers import (
    ActivationObservers,
    ObserverKind,
    averages_over_batches,
    dynamic_per_forward,
    reads_outputs,
)
from compressor.modifiers.quantization.scheme import QuantizationSchemeMixin
from compressor.modifiers.quantization.training import TrainingPathway
from compressor.modifiers.quantization.training_options import check_training_options

__all__ = ["QuantizationModifier"]


class QuantizationPathway(Protocol):
    """What QuantizationModifier does from its start to its finalize, one object per pathway
    (``PostTrainingPathway``, ``TrainingPathway``), holding that pathway's runtime state."""

    def start(self, event: Event) -> None: ...

    def update(self, event: Event) -> None: ...

    def end(self, event: Event) -> None: ...

    def finalize(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def _refuse_microscaling_in_training(config: QuantizationConfig, start: float) -> None:
    """NVFP4 / MX scales (a global scale, fp8 or power-of-two group scales) are calibrated
    post-training only; the training pathway's fake quantization has plain scales."""
    for name, group in config.config_groups.items():
        assert isinstance(group, QuantizationScheme)
        for role in ("weights", "input_activations", "output_activations"):
            args = getattr(group, role)
            if args is not None and (
                args.scale_dtype is not None or args.num_bits == 4 and args.type == "float"
            ):
                raise ValueError(
                    f"config_groups -> {name} -> {role}: {args.num_bits}-bit float with "
                    f"{args.scale_dtype} scales (NVFP4 / MX) with start={start!r}: these formats "
                    "are quantized post-training only; leave start unset"
                )


@Modifier.register()
class QuantizationModifier(QuantizationSchemeMixin, ExpertCalibrationFields, Modifier):
    """Quantize weights and activations with compressed-tensors schemes.

    Post-training, observers collect activation ranges over calibration batches and the
    model ends in compressed-tensors' frozen state, ready for ``save_compressed``. With a
    ``start``, training batches see fake-quantized weights and activations with a
    straight-through gradient (quantization-aware training, Jacob et al., 2018,
    https://arxiv.org/abs/1712.05877).

    **Lifecycle**

    - ``on_initialize``: unfold fused mixture-of-experts weights into one Linear per expert
      (``compressor.modifiers.moe``; routers stay exact, unknown expert layouts are refused);
      resolve the scheme, check it against the model (targets, group sizes, dtypes; with
      ``kv_cache_scheme``, that every attention module's cache can be hooked)
    - ``on_start`` on CALIBRATION_EPOCH_START (post-training): attach compressed-tensors
      quantization, set weight scales from the weights, observe static activation ranges
      with forward hooks (and the keys and values written to the cache) while the quantized
      forwards stay off (until each module's stage ends, with ``true_sequential``); every
      token runs through every expert for those ranges (``calibrate_all_experts``)
    - ``on_start`` on BATCH_START (training): fake-quantize weights (a parametrization) and
      activations (hooks), both with straight-through gradients; observers update ranges
    - ``on_update`` at SEQUENTIAL_EPOCH_END (post-training): set the static scales of the
      modules the event carries from their ranges and switch their quantized forwards on, so
      the next layer calibrates on their quantized outputs
    - ``on_update`` (training): lower the weight bits on the progressive schedule and the
      full-precision share of blended weights; on the BATCH_START that reaches
      ``activation_start``, begin fake-quantizing activations
    - ``on_end``: calibration: set the scales of the modules no SEQUENTIAL_EPOCH_END
      carried and freeze every module; training: stop updating activation ranges. Under DDP
      the static ranges are first reduced over every rank (min / max, or the mean for
      ``moving_average``), so every rank freezes and saves the same scales
    - ``on_finalize``: training: remove the fake quantization, attach compressed-tensors
      quantization with scales from the final weights and observed ranges, frozen; never
      started (when no calibration is needed): attach it with scales from the weights,
      frozen; from then on ``model.save_pretrained`` writes the compressed-tensors format

    Each pathway is an object that holds its runtime state: ``PostTrainingPathway``
    (``calibration.py``) and ``TrainingPathway`` (``training.py``); the modifier picks one
    when it starts and hands it the events.

    :param targets: see QuantizationSchemeMixin
    :param ignore: see QuantizationSchemeMixin
    :param scheme: see QuantizationSchemeMixin
    :param config_groups: see QuantizationSchemeMixin
    :param kv_cache_scheme: see QuantizationSchemeMixin (post-training only)
    :param observer: how static activation ranges accumulate for args that name no
        observer: ``minmax`` (extremes) or ``moving_average``. An explicit config group's own
        ``observer`` wins over it, with llm-compressor's names (``static_minmax`` extremes,
        ``minmax`` a moving average with ``averaging_constant`` 0.01, ``memoryless_minmax``
        the last batch; see ``make_observer``)
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
    :param true_sequential: post-training static activation ranges on the sequential
        pipeline: observe a Llama-style layer's Linears group by group in the order it calls
        them (q/k/v, o, gate/up, down), each group's scales set before the next is observed,
        so every range is the one the quantized model's forward sees; it needs fewer matrix
        products than observing the layer whole and running it again
        (``compressor.calibration.pipelines.staged``). False observes every Linear of a layer
        with the layer unquantized, as llm-compressor does (the layers before it are quantized
        either way). Layers of another form, static outputs and a ``kv_cache_scheme`` are
        always observed whole
    :param calibrate_all_experts: see ExpertCalibrationFields (static activations only)
    :param min_expert_tokens: see ExpertCalibrationFields
    :param moe_mappings: see ExpertCalibrationFields
    :param low_bit_weights: training only: ``ternary`` (``alpha * {-1, 0, 1}``) or
        ``binary`` (``alpha * {-1, 1}``) weights per output row, as in DeepSpeed's XTC; the
        config groups' weights must be int, 2 bits, symmetric, channel strategy (the
        checkpoint stores them as 2-bit codes with alpha as the scale)
    """

    observer: ObserverKind = "minmax"
    momentum: float = Field(default=0.95, gt=0.0, lt=1.0)
    true_sequential: bool = True
    rounding: Literal["nearest", "stochastic"] = "nearest"
    start_bits: int | None = Field(default=None, ge=2, le=16)
    target_bits: int | None = Field(default=None, ge=2, le=8)
    quantization_period: int | None = Field(default=None, ge=1)
    activation_start: float | None = None
    weight_blend_rate: float | None = Field(default=None, gt=0.0, le=1.0)
    low_bit_weights: LowBitWeights | None = None

    _config: QuantizationConfig | None = PrivateAttr(default=None)
    _modules: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _schemes: dict[str, QuantizationScheme] = PrivateAttr(default_factory=dict)
    _pathway: QuantizationPathway | None = PrivateAttr(default=None)
    _kv_modules: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _coverage: ExpertCoverage | None = PrivateAttr(default=None)
    # experts see the tokens routed to them, rows mixed: per-batch ranges need batches alone
    _routed_inputs: bool = PrivateAttr(default=False)

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
        if self.start is not None:
            _refuse_microscaling_in_training(self.resolve_quantization_config(), self.start)
        if self.kv_cache_scheme is not None and self.start is not None:
            raise ValueError(
                f"kv_cache_scheme with start={self.start!r}: the key/value cache is quantized "
                "post-training only (calibrated scales); leave start unset, or drop "
                "kv_cache_scheme from this training-aware modifier"
            )
        return self

    # ---------------------------------------------------------------- calibration needs
    def requires_calibration_data(self) -> bool:
        """True when a scheme has static activation ranges to observe."""
        return self.resolve_quantization_config().requires_calibration_data()

    def calibration_traits(self) -> CalibrationTraits:
        """Offloaded models are supported: post-training scales and baked weights are written
        with update_offload_parameter (training-aware quantization does not run on offloaded
        models). Static ranges are reduced over the ranks of a process group when they are
        extremes (``minmax``); a moving average depends on batch order, so is not."""
        config = self.resolve_quantization_config()
        moving = averages_over_batches(config, self.observer, prefer_args=self.scheme is None)
        post_training = self.start is None
        return CalibrationTraits(
            supports_offloaded_models=True,
            # a layer is observed with its quantized forwards off and its scales set once its
            # calibration ends (PostTrainingPathway): extremes over tokens, however batched;
            # a per-batch range (moving average, last batch) splits stacked batches apart
            # again, which experts' routed tokens do not allow; not when the cache is
            # quantized as it is observed, or the re-run quantizes an activation with one
            # dynamic scale per forward
            reads_outputs=not post_training or reads_outputs(config),
            merges_batches=post_training
            and not (moving and self._routed_inputs)
            and config.kv_cache_scheme is None
            and not dynamic_per_forward(config),
            reduces_across_ranks=not moving,
            # stages need each group's forward pre-hooks only, and its scales set at the
            # stage's end (PostTrainingPathway._finish on SEQUENTIAL_EPOCH_END's modules)
            in_stages=post_training and self.true_sequential and not reads_outputs(config),
            # a module's weights rounded to their observed scales at its stage's end
            compresses_lightly=post_training,
        )

    @property
    def quantized_modules(self) -> dict[str, torch.nn.Module]:
        """The modules this modifier quantizes, by name (known after initialize)."""
        return dict(self._modules)

    # ---------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State) -> None:
        if state.model is None:
            raise ValueError("QuantizationModifier needs a model in the state")
        config = self.resolve_quantization_config()
        experts = prepare_experts(
            state.model, list(config.ignore or []), type(self).__name__, tuple(self.moe_mappings)
        )
        self._config = keep_routing_exact(config, experts.exact)
        self._routed_inputs = bool(experts.experts)
        if self._config.kv_cache_scheme is not None:
            self._kv_modules = match_kv_cache_modules(state.model)
        if self._config.config_groups:
            self._modules = match_quantizable_modules(
                state.model, self._config, (*QUANTIZABLE_MODULE_TYPES, torch.nn.Conv2d)
            )
        self._schemes = schemes_by_module(self._modules, self._config)
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in self._modules.values())
        if convs:
            logger.info(
                "{}: {} convolution(s) get quantized weight values but stay dense in checkpoints "
                "(compressed-tensors has no convolution format)",
                type(self).__name__,
                convs,
            )
        logger.info(
            "{} will quantize {} module(s){}",
            type(self).__name__,
            len(self._modules),
            f" and the key/value cache of {len(self._kv_modules)} attention module(s)"
            if self._kv_modules
            else "",
        )

    def on_start(self, state: State, event: Event) -> None:
        if event.type_ == EventType.CALIBRATION_EPOCH_START:
            self._pathway = self._post_training_pathway(state)
            if self.requires_calibration_data():
                assert state.model is not None
                self._coverage = ExpertCoverage.started_for(self, state.model)
        else:
            self._pathway = self._training_pathway(state)
        self._pathway.start(event)

    def on_update(self, state: State, event: Event) -> None:
        assert self._pathway is not None
        self._pathway.update(event)

    def on_end(self, state: State, event: Event) -> None:
        assert self._pathway is not None
        if self._coverage is not None:
            self._coverage.end()
        self._pathway.end(event)

    def on_finalize(self, state: State) -> None:
        if self._pathway is None:  # never started: quantize now, if no calibration is needed
            if self.requires_calibration_data():
                raise RuntimeError(
                    f"{type(self).__name__} has static activation ranges to observe but no "
                    "calibration ran (no CALIBRATION_EPOCH_START): give calibration data, or "
                    "use dynamic activations (for example scheme W8A8 or FP8_DYNAMIC)"
                )
            self._pathway = self._post_training_pathway(state)
            self._pathway.start(Event(type_=EventType.FINALIZE))
            self._pathway.end(Event(type_=EventType.FINALIZE))
        self._pathway.finalize()

    def _observers(self) -> ActivationObservers:
        # a preset's own observer name is its default; the modifier's observer field wins
        return ActivationObservers(self.observer, self.momentum, prefer_args=self.scheme is None)

    def _post_training_pathway(self, state: State) -> PostTrainingPathway:
        assert self._config is not None and state.model is not None
        return PostTrainingPathway(
            state.model,
            self._config,
            self._modules,
            self._schemes,
            self._observers(),
            hooks=self,
            owner=type(self).__name__,
            kv_cache=KVCacheCalibration(
                state.model,
                self._kv_modules,
                self._config.kv_cache_scheme,
                self._observers(),
                hooks=self,
            )
            if self._config.kv_cache_scheme is not None
            else None,
        )

    def _training_pathway(self, state: State) -> TrainingPathway:
        assert self._config is not None and state.model is not None
        return TrainingPathway(
            state.model,
            self._config,
            self._modules,
            self._schemes,
            self._observers(),
            hooks=self,
            owner=type(self).__name__,
            rounding=self.rounding,
            low_bit_weights=self.low_bit_weights,
            start_bits=self.start_bits,
            target_bits=self.target_bits,
            quantization_period=self.quantization_period,
            weight_blend_rate=self.weight_blend_rate,
            activation_start=self.activation_start,
        )

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Training state for a resumed run: the step the bit schedule counts from, whether
        the activation ranges are frozen, and every observer's range."""
        if self._pathway is None:
            return {"start_step": 0, "ranges_frozen": False, "observers": {}}
        return self._pathway.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()`` after the resumed run has started the modifier again."""
        try:
            if self._pathway is None:  # not started: no range to restore, none may be given
                self._observers().load_state_dict(state_dict.get("observers", {}))
            else:
                self._pathway.load_state_dict(state_dict)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None

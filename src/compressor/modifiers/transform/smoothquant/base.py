"""SmoothQuantModifier: activation outliers moved into the weights before W8A8 quantization."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator

from compressor.architectures import Feature
from compressor.core.state import State
from compressor.modifiers.base import Modifier
from compressor.modifiers.transform.layerwise import LayerSmoothingModifier
from compressor.modifiers.transform.smoothing import ResolvedSmoothing, smoothed_width
from compressor.modifiers.transform.smoothquant.scales import (
    log_equalization_scales,
    smoothquant_scales,
)
from compressor.utils import distributed

__all__ = ["LogarithmicEqualizationModifier", "SmoothQuantModifier"]


@Modifier.register("SmoothQuant")
class SmoothQuantModifier(LayerSmoothingModifier):
    """Divide each smoothed activation channel by a scale and multiply the weights reading it
    by the same scale, so that activation outliers move into the weights and an 8-bit
    activation grid loses less; the model computes the same function.

    Paper: Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
    for Large Language Models" (arXiv:2211.10438). Scales as llm-compressor computes them:
    ``s = range(X) ** alpha / (2 max |W|) ** (1 - alpha)`` per channel (``smoothquant_scales``).

    **Lifecycle**

    - ``on_initialize``: resolve the mappings (the architecture's when unset: each norm ->
      the projections it feeds); errors name a mapping that matches nothing or does not fit
    - ``on_start`` (calibration start): a forward hook on each smooth layer keeps its
      per-channel output minima and maxima
    - ``on_update`` at SEQUENTIAL_EPOCH_END: fold the scales of the layer just calibrated into
      its norms (divided) and the following Linears' columns (multiplied); the pipelines run
      this before the quantizers calibrate the layer (``CalibrationTraits.transforms_first``)
    - ``on_end``: hooks removed; a smooth layer no calibration data reached is an error
    - ``finalize``: nothing left; quantization is the next modifier's (QuantizationModifier
      or GPTQModifier, W8A8 with static per-tensor or dynamic per-token activations)

    .. code-block:: yaml

        quant_stage:
          quant_modifiers:
            SmoothQuantModifier:
              smoothing_strength: 0.8
              mappings:
                - [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"]
                - [["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"]
            GPTQModifier: {targets: [Linear], ignore: [lm_head], scheme: W8A8}

    :param smoothing_strength: alpha, the share of the outliers moved into the weights, in
        [0, 1]
    :param mappings: ``[[balance layers], smooth layer]`` pairs (llm-compressor's form; the
        dict form ``{smooth_layer, balance_layers}`` too); the architecture's when unset
    :param ignore: smooth layers to leave unsmoothed (match strings); logged
    :param num_calibration_steps: accepted for llm-compressor's recipes, whose 0.14 code does
        not use it either: every calibration batch is observed (a warning says so); give
        oneshot fewer samples to calibrate on fewer
    :param algorithm: ``smoothquant`` (the scales above) or ``log_equalization``
        (llm-compressor's name for logarithmic equalization, Li et al. 2023,
        arXiv:2308.15987: ``s = range(X) / log2(2 + range(X))``, from the activation alone;
        ``smoothing_strength`` does not enter it, and a warning says so when the recipe sets
        it)
    """

    smoothing_strength: float = Field(default=0.5)
    algorithm: Literal["smoothquant", "log_equalization"] = "smoothquant"
    ignore: list[str] = Field(default_factory=list)
    num_calibration_steps: int | None = Field(default=None, ge=1)

    _feature: ClassVar[Feature] = "smoothquant"
    _ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = PrivateAttr(default_factory=dict)

    @field_validator("smoothing_strength")
    @classmethod
    def _alpha_in_unit_interval(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"smoothing_strength={value} must lie in [0, 1] (0: no smoothing, 1: every "
                "outlier moved into the weights; 0.5 to 0.8 are usual)"
            )
        return value

    @field_validator("ignore", mode="before")
    @classmethod
    def _none_or_one_string(cls, value: object) -> object:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    def _ignored(self) -> list[str]:
        return list(self.ignore)

    def on_initialize(self, state: State) -> None:
        if self.num_calibration_steps is not None:
            logger.warning(
                "SmoothQuantModifier: num_calibration_steps={} has no effect (nor in "
                "llm-compressor 0.14): every calibration batch is observed",
                self.num_calibration_steps,
            )
        if self.algorithm == "log_equalization" and "smoothing_strength" in self.model_fields_set:
            logger.warning(
                "{}: smoothing_strength={} has no effect with algorithm log_equalization (its "
                "scales come from the activation ranges alone)",
                type(self).__name__,
                self.smoothing_strength,
            )
        super().on_initialize(state)

    def _observe(self, resolved: ResolvedSmoothing) -> None:
        name = resolved.smooth_name
        width = resolved.balances[0].in_features
        assert smoothed_width(resolved.smooth, width) == width
        ranges = self._ranges

        def hook(_module: torch.nn.Module, _inputs: tuple, output: object) -> None:
            out = output[0] if isinstance(output, tuple) else output
            assert isinstance(out, torch.Tensor)
            channels = out.detach()[..., -width:].reshape(-1, width)
            lo, hi = torch.aminmax(channels.float(), dim=0)
            if name in ranges:
                old_lo, old_hi = ranges[name]
                lo, hi = torch.minimum(lo, old_lo), torch.maximum(hi, old_hi)
            ranges[name] = (lo, hi)

        self.register_hook(resolved.smooth, hook, "forward")

    def _has_statistics(self, resolved: ResolvedSmoothing) -> bool:
        return resolved.smooth_name in self._ranges

    def _scales(self, resolved: ResolvedSmoothing) -> torch.Tensor:
        local_lo, local_hi = self._ranges.pop(resolved.smooth_name, (None, None))
        width = resolved.balances[0].in_features
        device = resolved.balances[0].weight.device
        # the extremes over every rank's data (a no-op in one process)
        lo = distributed.reduce_optional(local_lo, (width,), "min", device=device)
        hi = distributed.reduce_optional(local_hi, (width,), "max", device=device)
        assert lo is not None and hi is not None  # some rank observed it
        if self.algorithm == "log_equalization":
            return log_equalization_scales(hi - lo)
        weights = [balance.weight for balance in resolved.balances]
        return smoothquant_scales(hi - lo, weights, self.smoothing_strength)


@Modifier.register("LogarithmicEqualization")
class LogarithmicEqualizationModifier(SmoothQuantModifier):
    """llm-compressor's ``LogarithmicEqualizationModifier`` (deprecated there in favour of
    ``SmoothQuantModifier(algorithm: log_equalization)``): the same modifier with that
    algorithm by default, so its recipes run unchanged."""

    algorithm: Literal["smoothquant", "log_equalization"] = "log_equalization"

"""Tiny models and probes shared by the SmoothQuant and AWQ tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from datasets import Dataset
from loguru import logger
from pydantic import PrivateAttr

from compressor.core.events import Event, EventType
from compressor.core.state import State
from compressor.modifiers import HooksMixin, Modifier
from compressor.modifiers.base import CalibrationTraits
from compressor.modifiers.transform.smoothing import quantized_forwards_off
from conftest import tiny_llama_config

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))


def with_outlier_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Norm scales spread over [0.2, 5] (a few channels large, as in trained models), so that
    smoothing scales differ from one and folding them is a real change."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.copy_(torch.rand(param.shape, generator=gen) * 1.8 + 0.2)
                param[:2] *= 2.5
    return model.eval()


def tiny_llama(**overrides) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return with_outlier_norms(LlamaForCausalLM(tiny_llama_config(**overrides)))


def tiny_qwen3() -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return with_outlier_norms(Qwen3ForCausalLM(config))


def tiny_qwen2_mha() -> torch.nn.Module:
    """Qwen2 (biases on q/k/v) with as many key-value heads as query heads, so that AWQ's
    v_proj -> o_proj mapping applies."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return with_outlier_norms(Qwen2ForCausalLM(config))


def random_ids(count: int = 8, length: int = 24) -> Dataset:
    gen = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"input_ids": torch.randint(0, 128, (count, length), generator=gen)})


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


class FunctionProbe(Modifier):
    """Placed after a smoothing modifier (and a quantizer that changes no weight at layer
    ends, QuantizationModifier), calibrated in the same first pass: at each layer's end, the
    full-precision logits of the whole model, with the layers smoothed so far."""

    _logits: list = PrivateAttr(default_factory=list)

    def requires_calibration_data(self) -> bool:
        return True

    def calibration_traits(self) -> CalibrationTraits:
        return CalibrationTraits(supports_offloaded_models=True, transforms_first=True)

    def on_update(self, state: State, event: Event) -> None:
        if event.type_ == EventType.SEQUENTIAL_EPOCH_END:
            with HooksMixin.disable_hooks(), quantized_forwards_off(state.model):
                self._logits.append(logits(state.model))


@contextlib.contextmanager
def captured_logs(level: str = "INFO") -> Iterator[list[str]]:
    """The library's log lines (loguru) inside the block."""
    lines: list[str] = []
    handle = logger.add(lambda m: lines.append(str(m)), level=level, format="{message}")
    try:
        yield lines
    finally:
        logger.remove(handle)

"""Overlapping config groups: every path quantizes a module with the scheme of its most
specific target (``scheme_for_module``), the one compressed-tensors attaches and saves."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from compressed_tensors.quantization import quantize
from datasets import Dataset
from loguru import logger
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from compressor import create_session, oneshot, save_compressed
from compressor.modifiers import GPTQModifier, QuantizationModifier
from conftest import tiny_llama_config


def _channel(bits: int) -> dict:
    return {"num_bits": bits, "strategy": "channel", "symmetric": True}


# the reproduction: every Linear at 8 bits, down_proj at 4
LINEAR_8_DOWN_4 = {
    "linear": {"targets": ["Linear"], "weights": _channel(8)},
    "down": {"targets": ["re:.*down_proj"], "weights": _channel(4)},
}
# group 32 divides every Linear's input width of the 48-wide-MLP Llama but down_proj's (48):
# only down_proj's own, more specific, channel scheme fits it
LINEAR_G32_DOWN_CHANNEL = {
    "linear": {"targets": ["Linear"], "weights": {"num_bits": 8, "group_size": 32}},
    "down": {"targets": ["re:.*down_proj"], "weights": _channel(4)},
}


@pytest.fixture
def mlp48_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(intermediate_size=48)).eval()


@pytest.fixture
def warnings(caplog):
    """The warnings so far: ours (loguru) and compressed-tensors' (standard logging)."""
    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(str(m)), level="WARNING", format="{message}")

    def collected() -> list[str]:
        theirs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        return messages + theirs

    yield collected
    logger.remove(handle)


def _codes(module) -> torch.Tensor:
    args = module.quantization_scheme.weights
    zero = getattr(module, "weight_zero_point", None)
    return quantize(module.weight, module.weight_scale, zero, args, dtype=torch.float32)


def _assert_down_4_bit_channel(model) -> None:
    for layer in model.model.layers:
        down, gate = layer.mlp.down_proj, layer.mlp.gate_proj
        assert down.quantization_scheme.weights.num_bits == 4
        assert down.weight_scale.shape == (down.out_features, 1)  # one scale per row
        codes = _codes(down)
        assert codes.min() >= -8 and codes.max() <= 7
        assert gate.quantization_scheme.weights.num_bits == 8
        assert gate.quantization_scheme.weights.strategy == "group"


def test_post_training_quantizes_each_module_with_its_deciding_scheme(
    mlp48_llama, token_batches, warnings
):
    modifier = QuantizationModifier(config_groups=LINEAR_G32_DOWN_CHANNEL)
    with create_session() as session:
        session.initialize(mlp48_llama, [modifier])
        session.calibration_epoch_start()
        with torch.no_grad():
            for batch in token_batches:
                mlp48_llama(**batch)
        session.calibration_epoch_end()
        session.finalize()
    _assert_down_4_bit_channel(mlp48_llama)
    assert warnings() == []


class _TwoConvs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3)
        self.conv2 = torch.nn.Conv2d(8, 8, 3)

    def forward(self, x):
        return self.conv2(self.conv1(x))


def test_post_training_bakes_each_convolution_with_its_deciding_scheme(warnings):
    torch.manual_seed(0)
    model = _TwoConvs()
    groups = {
        "convs": {"targets": ["Conv2d"], "weights": _channel(8)},
        "second": {"targets": ["conv2"], "weights": _channel(4)},
    }
    with create_session() as session:
        session.initialize(model, [QuantizationModifier(config_groups=groups, ignore=[])])
        session.calibration_epoch_start()
        session.calibration_epoch_end()
        session.finalize()

    def most_values_per_channel(conv):
        return max(len(torch.unique(row)) for row in conv.weight.detach().flatten(1))

    assert most_values_per_channel(model.conv2) <= 16
    assert most_values_per_channel(model.conv1) > 16  # 27 weights a channel, 8-bit grid
    assert warnings() == []


def _train(model, modifier, batches, steps, inspect):
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with create_session() as session:
        session.initialize(model, [modifier], optimizer=optimizer)
        for step in range(steps):
            batch = batches[step % len(batches)]
            session.batch_start(batch_data=batch)
            loss = session.loss_calculated(model(**batch, labels=batch["input_ids"]).loss)
            loss.backward()
            inspect(step, model)
            optimizer.step()
            optimizer.zero_grad()
            session.batch_end()
        seen = {
            name: module.weight.detach().clone()  # the fake-quantized final weights
            for name, module in model.named_modules()
            if name.endswith(("down_proj", "q_proj"))
        }
        session.finalize()
    model.eval()
    return seen


def test_training_fake_quantizes_each_module_with_its_deciding_scheme(
    tiny_llama, token_batches, warnings
):
    bits = {}

    def inspect(step, model):
        for name, module in model.named_modules():
            if name.endswith(("down_proj", "q_proj")):
                bits[name] = module.parametrizations.weight[0].num_bits
                if name.endswith("down_proj"):
                    rows = module.weight.detach()
                    assert max(len(torch.unique(row)) for row in rows) <= 16

    modifier = QuantizationModifier(config_groups=LINEAR_8_DOWN_4, start=0)
    _train(tiny_llama, modifier, token_batches, steps=2, inspect=inspect)
    assert {name: b for name, b in bits.items() if name.endswith("down_proj")} == {
        "model.layers.0.mlp.down_proj": 4,
        "model.layers.1.mlp.down_proj": 4,
    }
    assert {b for name, b in bits.items() if name.endswith("q_proj")} == {8}
    assert warnings() == []


def test_the_checkpoint_holds_the_weights_training_saw(tiny_llama, token_batches, tmp_path):
    modifier = QuantizationModifier(config_groups=LINEAR_8_DOWN_4, start=0)
    seen = _train(tiny_llama, modifier, token_batches, steps=3, inspect=lambda *_: None)
    out = save_compressed(tiny_llama, tmp_path / "ckpt", recipe=[modifier])
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [4, 8]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():  # the first forward decompresses the packed weights
        model(token_batches[0]["input_ids"])
    reloaded = dict(model.named_modules())
    for name, weight in seen.items():
        assert torch.allclose(reloaded[name].weight, weight, atol=1e-6), name


def test_gptq_quantizes_each_module_with_its_deciding_scheme(mlp48_llama, warnings):
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    gptq = GPTQModifier(config_groups=LINEAR_G32_DOWN_CHANNEL, block_size=16)
    # the request matches the data: nothing to warn about
    oneshot(mlp48_llama, [gptq], Dataset.from_dict({"input_ids": ids}), pipeline="sequential",
            num_calibration_samples=8, max_seq_length=32)  # fmt: skip
    _assert_down_4_bit_channel(mlp48_llama)
    assert warnings() == []

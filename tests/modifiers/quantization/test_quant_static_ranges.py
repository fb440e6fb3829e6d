"""Static activation ranges post-training: each decoder layer observed in full precision, its
scales set when its calibration ends, its quantized outputs passed to the next layer."""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs
from datasets import Dataset

from compressor import oneshot
from compressor.modifiers import QuantizationModifier
from compressor.modifiers.quantization.observers import qparams_from_range

INT8 = {"num_bits": 8, "symmetric": True}
STATIC_W8A8 = {
    "g": {
        "targets": ["Linear"],
        "weights": {**INT8, "strategy": "channel"},
        "input_activations": {**INT8, "strategy": "tensor", "dynamic": False, "observer": "minmax"},
    }
}


def _rows(count: int = 8, length: int = 32) -> Dataset:
    gen = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"input_ids": torch.randint(0, 128, (count, length), generator=gen)})


def _input_range(model: torch.nn.Module, module: torch.nn.Module, rows: Dataset) -> tuple:
    """The extremes of ``module``'s inputs over ``rows``, fed one row at a time."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for ids in rows["input_ids"]:
                model(input_ids=torch.tensor(ids).unsqueeze(0))
    finally:
        handle.remove()
    values = torch.cat([s.flatten() for s in seen])
    return values.min().reshape(1), values.max().reshape(1)


def _expected_scale(lo: torch.Tensor, hi: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    args = module.quantization_scheme.input_activations
    assert isinstance(args, QuantizationArgs)
    return qparams_from_range(lo, hi, args, "expected")[0].reshape(-1)


def test_a_layer_is_observed_in_full_precision_on_the_quantized_previous_layers(tiny_llama):
    """o_proj's input scale is the range of its inputs when its own layer computes in full
    precision (q/k/v not quantized) and the layers before it are quantized. It fails if the
    layer's forwards were quantized while its ranges were observed, or if the previous layers
    were not quantized when it was."""
    rows = _rows()
    modifier = QuantizationModifier(config_groups=STATIC_W8A8, ignore=["lm_head"])
    model = oneshot(tiny_llama, [modifier], rows, pipeline="sequential", batch_size=1)
    layers = model.model.layers
    for index, layer in enumerate(layers):
        later = [m for lay in layers[index:] for m in lay.modules() if hasattr(m, "input_scale")]
        for module in later:  # this layer and the next ones in full precision
            module.quantization_enabled = False
        try:
            o_proj = layer.self_attn.o_proj
            expected = _expected_scale(*_input_range(model, o_proj, rows), o_proj)
        finally:
            for module in later:
                module.quantization_enabled = True
        torch.testing.assert_close(o_proj.input_scale.reshape(-1), expected, rtol=1e-4, atol=0)


def test_the_ranges_do_not_depend_on_how_the_rows_are_batched(tiny_llama):
    """Extremes over tokens: one row per batch or all rows stacked give the same scales (the
    sequential pipeline may run cached batches stacked)."""
    alone, stacked = tiny_llama, type(tiny_llama)(tiny_llama.config).eval()
    stacked.load_state_dict(tiny_llama.state_dict())
    rows = _rows()
    for model, batch_size in ((alone, 1), (stacked, len(rows))):
        modifier = QuantizationModifier(config_groups=STATIC_W8A8, ignore=["lm_head"])
        oneshot(model, [modifier], rows, pipeline="sequential", batch_size=batch_size)
    scales = {n: m.input_scale for n, m in alone.named_modules() if hasattr(m, "input_scale")}
    assert len(scales) == 14
    for name, module in stacked.named_modules():
        if name in scales:
            torch.testing.assert_close(module.input_scale, scales[name], rtol=1e-4, atol=0)

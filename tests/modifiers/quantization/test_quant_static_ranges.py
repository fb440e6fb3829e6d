"""Static activation ranges post-training: each decoder layer observed in full precision, its
scales set when its calibration ends, its quantized outputs passed to the next layer."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from datasets import Dataset

from compressor import oneshot
from compressor.modifiers import GPTQModifier, QuantizationModifier
from compressor.modifiers.quantization.observers import qparams_from_range

INT8 = {"num_bits": 8, "symmetric": True}
STATIC_W8A8 = {
    "g": {
        "targets": ["Linear"],
        "weights": {**INT8, "strategy": "channel"},
        "input_activations": {
            **INT8,
            "strategy": "tensor",
            "dynamic": False,
            "observer": "static_minmax",
        },
    }
}


def _rows(count: int = 8, length: int = 32) -> Dataset:
    gen = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"input_ids": torch.randint(0, 128, (count, length), generator=gen)})


def _per_row_ranges(model: torch.nn.Module, module: torch.nn.Module, rows: Dataset) -> list:
    """(min, max) of ``module``'s inputs for each row, fed one row at a time."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(_m: torch.nn.Module, args: tuple) -> None:
        seen.append((args[0].detach().min().reshape(1), args[0].detach().max().reshape(1)))

    handle = module.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            for ids in rows["input_ids"]:
                model(input_ids=torch.tensor(ids).unsqueeze(0))
    finally:
        handle.remove()
    return seen


def _input_range(model: torch.nn.Module, module: torch.nn.Module, rows: Dataset) -> tuple:
    """The extremes of ``module``'s inputs over ``rows``, fed one row at a time."""
    ranges = _per_row_ranges(model, module, rows)
    lo = torch.stack([batch_lo for batch_lo, _ in ranges]).min()
    hi = torch.stack([batch_hi for _, batch_hi in ranges]).max()
    return lo.reshape(1), hi.reshape(1)


def _expected_scale(lo: torch.Tensor, hi: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    args = module.quantization_scheme.input_activations
    assert isinstance(args, QuantizationArgs)
    return qparams_from_range(lo, hi, args, "expected")[0].reshape(-1)


def test_a_layer_is_observed_in_full_precision_on_the_quantized_previous_layers(tiny_llama):
    """true_sequential false (llm-compressor's way): o_proj's input scale is the range of its
    inputs when its own layer computes in full precision (q/k/v not quantized) and the layers
    before it are quantized. It fails if the layer's forwards were quantized while its ranges
    were observed, or if the previous layers were not quantized when it was."""
    rows = _rows()
    modifier = QuantizationModifier(
        config_groups=STATIC_W8A8, ignore=["lm_head"], true_sequential=False
    )
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


def test_in_stages_each_range_is_the_one_the_quantized_layer_sees(tiny_llama):
    """true_sequential (the default): o_proj's input scale is the range of its inputs with the
    layer's q/k/v already quantized (o_proj and the later modules not), and down_proj's with
    everything before it quantized. It fails if the stages did not switch each group's
    quantized forwards on before the next group was observed."""
    rows = _rows()
    modifier = QuantizationModifier(config_groups=STATIC_W8A8, ignore=["lm_head"])
    model = oneshot(tiny_llama, [modifier], rows, pipeline="sequential", batch_size=1)
    layers = model.model.layers
    for index, layer in enumerate(layers):
        for target, first_off in (
            (layer.self_attn.o_proj, layer.self_attn.o_proj),
            (layer.mlp.down_proj, layer.mlp.down_proj),
        ):
            # the target itself and every module called after it, in this layer and later
            order = [
                m for lay in layers[index:] for m in lay.modules() if hasattr(m, "input_scale")
            ]
            later = order[order.index(first_off) :]
            for module in later:
                module.quantization_enabled = False
            try:
                expected = _expected_scale(*_input_range(model, target, rows), target)
            finally:
                for module in later:
                    module.quantization_enabled = True
            torch.testing.assert_close(target.input_scale.reshape(-1), expected, rtol=1e-4, atol=0)


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


def _llmcompressor_accumulate(ranges: list, observer: str, constant: float) -> tuple:
    """What llm-compressor's observers of that name keep over the batches, written out:
    static_minmax the extremes, minmax ``running + c * (batch - running)``, memoryless_minmax
    the last batch's range."""
    lo, hi = ranges[0]
    for batch_lo, batch_hi in ranges[1:]:
        if observer == "static_minmax":
            lo, hi = torch.minimum(lo, batch_lo), torch.maximum(hi, batch_hi)
        elif observer == "minmax":
            lo, hi = lo + constant * (batch_lo - lo), hi + constant * (batch_hi - hi)
        else:
            lo, hi = batch_lo, batch_hi
    return lo, hi


@pytest.mark.parametrize(
    ("observer", "kwargs", "constant"),
    [
        ("minmax", {}, 0.01),
        ("minmax", {"averaging_constant": 0.3}, 0.3),
        ("memoryless_minmax", {}, 1.0),
        ("static_minmax", {}, 0.0),
    ],
)
def test_config_group_observer_names_mean_what_llmcompressor_means(
    tiny_llama, observer, kwargs, constant
):
    """A config group's ``observer`` as llm-compressor's recipes mean it, per calibration
    batch (one row each): ``minmax`` a moving average with ``averaging_constant`` (0.01 by
    default), ``memoryless_minmax`` the last batch, ``static_minmax`` the extremes. Checked on
    layer 0's q_proj (its inputs do not depend on anything quantized). It fails if the
    names were all read as extremes, or if the batches were stacked for a moving average."""
    rows = _rows()
    reference = type(tiny_llama)(tiny_llama.config).eval()
    reference.load_state_dict(tiny_llama.state_dict())
    ranges = _per_row_ranges(reference, reference.model.layers[0].self_attn.q_proj, rows)
    groups = copy.deepcopy(STATIC_W8A8)
    groups["g"]["input_activations"].update(observer=observer, observer_kwargs=kwargs)
    modifier = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    model = oneshot(tiny_llama, [modifier], rows, pipeline="sequential", batch_size=1)
    q_proj = model.model.layers[0].self_attn.q_proj
    expected = _expected_scale(*_llmcompressor_accumulate(ranges, observer, constant), q_proj)
    torch.testing.assert_close(q_proj.input_scale.reshape(-1), expected, rtol=1e-4, atol=0)
    extremes = _expected_scale(*_llmcompressor_accumulate(ranges, "static_minmax", 0), q_proj)
    if observer != "static_minmax":  # the rows differ enough to tell the observers apart
        assert not torch.allclose(expected, extremes, rtol=1e-3)


@pytest.mark.parametrize(
    ("activations", "message"),
    [
        ({"observer": "minmax", "observer_kwargs": {"averaging_constant": 0.0}}, r"\(0, 1\]"),
        ({"observer": "minmax", "observer_kwargs": {"momentum": 0.5}}, "reads \\['averaging"),
        ({"observer": "static_minmax", "observer_kwargs": {"averaging_constant": 0.1}}, "none"),
        ({"observer": "mse"}, "observer='mse' is not supported"),
    ],
)
def test_bad_observer_arguments_are_refused_naming_them(activations, message):
    groups = copy.deepcopy(STATIC_W8A8)
    groups["g"]["input_activations"].update(activations)
    with pytest.raises(ValueError, match=message):
        QuantizationModifier(config_groups=groups, ignore=["lm_head"]).resolve_quantization_config()


@pytest.mark.parametrize("modifier_cls", [QuantizationModifier, GPTQModifier])
def test_a_moving_average_takes_stacked_batches_one_by_one(tiny_llama, modifier_cls):
    """The sequential pipeline stacks the cached batches into fewer forwards (faster on CPU);
    llm-compressor's ``minmax`` moving average still sees each batch on its own, so every
    layer's scales equal those of a run whose batches go one at a time (staged GPTQ with
    static inputs as well). It fails if a stacked forward were observed as one batch."""
    rows = _rows()
    groups = copy.deepcopy(STATIC_W8A8)
    groups["g"]["input_activations"].update(observer="minmax", observer_kwargs={})
    apart = type(tiny_llama)(tiny_llama.config).eval()
    apart.load_state_dict(tiny_llama.state_dict())
    forwards: list[int] = []
    layer = tiny_llama.model.layers[1]
    handle = layer.register_forward_pre_hook(lambda _m, _a: forwards.append(1))
    try:
        oneshot(tiny_llama, [modifier_cls(config_groups=groups, ignore=["lm_head"])],
                rows, pipeline="sequential", batch_size=1)  # fmt: skip
    finally:
        handle.remove()
    assert len(forwards) < len(rows)  # calibration and outputs: stacked forwards

    with mock.patch("compressor.calibration.pipelines.sequential.MERGE_TOKENS", 1):
        oneshot(apart, [modifier_cls(config_groups=groups, ignore=["lm_head"])],
                rows, pipeline="sequential", batch_size=1)  # fmt: skip
    scales = {n: m.input_scale for n, m in apart.named_modules() if hasattr(m, "input_scale")}
    assert len(scales) == 14
    for name, module in tiny_llama.named_modules():
        if name in scales:
            torch.testing.assert_close(module.input_scale, scales[name], rtol=1e-5, atol=0)

"""Rotations learned on the ranges of the rotated inputs (``learn_loss: input_range``): the
inputs are collected as the quantized Linears read them, the objective's gradient is right,
learning lowers the rounding noise the quantized model actually carries, the fused model is
exact, it runs in oneshot and under the Trainer, and bad input is refused."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from compressor import CompressionCallback, CompressionTrainer, create_session, oneshot
from compressor.modifiers import SpinQuantModifier
from compressor.modifiers.quantization.fake_quant import fake_quantize_activation
from compressor.modifiers.transform.spinquant import infer_mapping_from_model
from compressor.modifiers.transform.spinquant.cayley import orthogonality_error
from compressor.modifiers.transform.spinquant.input_ranges import (
    collect_reader_inputs,
    input_range_loss,
    learn_on_input_ranges,
)
from compressor.modifiers.transform.spinquant.learned import fuse_rotations, initial_rotations
from compressor.modifiers.transform.spinquant.rotated_model import (
    quantized_linears,
    rotation_plan,
)
from conftest import tiny_llama_config
from training_runs import make_trainer
from training_runs import model as training_model

A4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}


def _outlier_llama(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose residual stream has a few large channels (as trained models have),
    norms at one (so the rotations are exact without fusing norms first)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.2)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :3] *= 8.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:3] *= 4.0
            layer.mlp.down_proj.weight[:3] *= 4.0
    return model


def _rows(seed: int, count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, 128, (2, 16), generator=generator)} for _ in range(count)
    ]


def _setup(model):
    plan = rotation_plan(model, infer_mapping_from_model(model), ["R1", "R2"])
    start = initial_rotations(plan, "random-hadamard", {"R1": 32, "R2": 8}, randomize=True)
    return plan, start


# ---------------------------------------------------------------- collection
def test_inputs_are_collected_once_per_shared_reader_without_padding():
    model = _outlier_llama()
    plan, _ = _setup(model)
    linears = quantized_linears(model)
    masked = {
        "input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5)),
        "attention_mask": torch.tensor([[1] * 16, [1] * 10 + [0] * 6]),
    }
    inputs = collect_reader_inputs(model, plan, linears, [masked])
    layers = len(model.model.layers)
    # per layer: q/k/v read one input, gate/up another (R1), o_proj its own (R2)
    assert len(inputs) == 3 * layers
    groups = sorted(tuple(n.rsplit(".", 1)[-1] for n in e.names) for e in inputs)
    assert groups == sorted([("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                             ("o_proj",)] * layers)  # fmt: skip
    assert all(e.tokens.shape[0] == 26 for e in inputs)  # 16 + 10 real tokens
    first = next(e for e in inputs if e.names[0].endswith("layers.0.self_attn.q_proj"))
    expected = sum(
        float(getattr(model.model.layers[0].self_attn, n).weight.detach().double().pow(2).sum())
        for n in ("q_proj", "k_proj", "v_proj")
    )
    assert first.weight == pytest.approx(expected)
    assert first.key == "R1"
    # the first layer's q/k/v input is the first norm of the embeddings, padding left out
    normed = model.model.layers[0].input_layernorm(model.model.embed_tokens(masked["input_ids"]))
    real = torch.cat([normed[0], normed[1, :10]])
    assert torch.allclose(first.tokens.float(), real, rtol=1e-2, atol=1e-2)  # bfloat16
    # reading stops once enough tokens are in
    few = collect_reader_inputs(model, plan, linears, _rows(0), max_tokens=40)
    assert all(e.tokens.shape[0] == 40 for e in few)


# ---------------------------------------------------------------- the objective
def test_the_objective_is_the_rounding_noise_of_per_token_quantization():
    """Per input, mean over tokens of ||W||_F^2 * (max|z| / q)^2 / 12, the weights' share
    normalised; and in expectation that is the noise fake quantization puts on the output."""
    model = _outlier_llama()
    plan, start = _setup(model)
    inputs = collect_reader_inputs(model, plan, quantized_linears(model), _rows(0))
    total = sum(e.weight for e in inputs)
    by_hand = 0.0
    for e in inputs:
        r = start[e.key].float()
        z = (e.tokens.float().unflatten(-1, (-1, r.shape[0])) @ r).flatten(-2)
        by_hand += e.weight / total * float(z.abs().amax(-1).pow(2).mean()) / (12 * 49)
    assert float(input_range_loss(inputs, start, 7)) == pytest.approx(by_hand, rel=1e-5)


def test_the_objectives_gradient_matches_finite_differences():
    model = _outlier_llama()
    plan, start = _setup(model)
    inputs = collect_reader_inputs(model, plan, quantized_linears(model), _rows(0))
    for e in inputs:
        e.tokens = e.tokens.double()
    current = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    value = input_range_loss(inputs, current, 7)
    grads = torch.autograd.grad(value, list(current.values()))
    generator = torch.Generator().manual_seed(2)
    direction = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in
                 start.items()}  # fmt: skip
    predicted = sum(float((g * direction[k]).sum()) for k, g in zip(current, grads, strict=True))
    eps = 1e-6

    def at(sign):
        moved = {k: v + sign * eps * direction[k] for k, v in start.items()}
        return float(input_range_loss(inputs, moved, 7))

    assert (at(1) - at(-1)) / (2 * eps) == pytest.approx(predicted, rel=1e-4)


# ---------------------------------------------------------------- learning
def _rounding_noise(model, rows) -> float:
    """The noise per-token A4 fake quantization (compressed-tensors' arithmetic) puts on the
    outputs of the Linears that read rotated inputs, summed over them, on ``rows``."""
    args = QuantizationArgs(**A4)
    total = [0.0]

    def hook(module, inputs):
        x = inputs[0]
        error = fake_quantize_activation(x, args) - x
        total[0] += float((error @ module.weight.T).pow(2).sum())

    readers = [m for n, m in model.named_modules() if n.endswith(
        ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj"))]  # fmt: skip
    handles = [m.register_forward_pre_hook(hook) for m in readers]
    with torch.no_grad():
        for row in rows:
            model(**row)
    for handle in handles:
        handle.remove()
    return total[0]


def test_learning_lowers_the_noise_the_quantized_linears_carry():
    """Trained on some rows, the rotations lower the objective on other rows, the model
    computes what it did before, and on those rows the rounding noise that A4 quantization
    puts on the rotated readers' outputs is lower than with the start rotations."""
    train, held_out = _rows(0, 8), _rows(1)
    noise = {}
    for learned in (False, True):
        model = _outlier_llama()
        with torch.no_grad():
            expected = model(**held_out[0]).logits
        plan, start = _setup(model)
        linears = quantized_linears(model)
        rotations = start
        if learned:
            result = learn_on_input_ranges(model, plan, start, train, linears, 7, steps=100, lr=0.5)
            rotations = result.rotations
            assert result.end_loss < 0.9 * result.start_loss
            assert all(orthogonality_error(r) < 1e-10 for r in rotations.values())
            other = collect_reader_inputs(model, plan, linears, held_out)
            assert float(input_range_loss(other, rotations, 7)) < 0.9 * float(
                input_range_loss(other, start, 7)
            )
        fuse_rotations(plan, rotations)
        with torch.no_grad():
            assert (model(**held_out[0]).logits - expected).abs().max() < 1e-4
        noise[learned] = _rounding_noise(model, held_out)
    assert noise[True] < 0.95 * noise[False], noise


def _modifier(**overrides):
    values = dict(
        rotations=["R1", "R2"], learnable=True, learn_steps=20, learn_lr=0.5,
        learn_activations=A4, learn_loss="input_range",
    )  # fmt: skip
    values.update(overrides)
    return SpinQuantModifier(**values)


def test_oneshot_learns_on_input_ranges_and_stays_exact():
    from datasets import Dataset

    model = _outlier_llama()
    ids = _rows(1)[0]["input_ids"]
    expected = model(ids).logits
    rows = [row for batch in _rows(0) for row in batch["input_ids"].tolist()]
    modifier = _modifier(rotations=["R1", "R2", "R4"])
    compressed = oneshot(model, [modifier], dataset=Dataset.from_dict({"input_ids": rows}))
    learned = modifier.learned
    assert learned is not None and len(learned.losses) == 20
    assert set(learned.rotations) == {"R1", "R2:0", "R2:1"}
    assert all(orthogonality_error(r) < 1e-10 for r in learned.rotations.values())
    assert (compressed(ids).logits - expected).abs().max() < 1e-4


def test_under_the_trainer_input_ranges_are_learned_from_the_training_batches(tmp_path):
    model = training_model()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
    callback = CompressionCallback([_modifier(start=0, learn_steps=5)])
    trainer = make_trainer(model, callback, tmp_path, cls=CompressionTrainer, learning_rate=0.0)
    trainer.train()
    (modifier,) = callback.modifiers
    assert modifier.learned is not None and len(modifier.learned.losses) == 5
    model.eval()
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max() < 1e-4


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"learn_weights": W4}, "input_range learns on the ranges of the activations only"),
        (
            {"learn_activations": {**A4, "strategy": "tensor"}},
            "needs learn_activations with strategy token",
        ),  # fmt: skip
        ({"learn_activations": None, "learn_weights": W4}, "input_range learns on the ranges"),
        ({"learn_batch_size": 4}, "drop learn_batch_size"),
        ({"learn_loss": "input_ranges"}, "cross_entropy.*kl_to_full_precision.*input_range"),
    ],
)
def test_bad_input_range_arguments_fail_at_parse_time(overrides, message):
    with pytest.raises(ValidationError, match=message):
        _modifier(**overrides)


def test_a_plan_with_no_quantized_reader_is_refused():
    model = _outlier_llama()
    plan = [s for s in _setup(model)[0] if s.side == "output"]
    with pytest.raises(ValueError, match="no quantized Linear of the decoder layers reads"):
        collect_reader_inputs(model, plan, quantized_linears(model), _rows(0))


def test_the_session_learns_on_input_ranges_from_calibration_batches():
    model = _outlier_llama()
    modifier = _modifier(learn_steps=3)
    with create_session() as session:
        session.initialize(model, [modifier])
        session.calibration_epoch_start(_rows(0))
        session.calibration_epoch_end()
        session.finalize()
    assert modifier.learned is not None and len(modifier.learned.losses) == 3

"""Learned rotations (SpinQuant's Cayley SGD with quantizers in the loop): the optimizer keeps
the matrices orthogonal, training lowers the quantized model's loss, the fused model computes
what the unrotated one did, in oneshot and under the Trainer, and bad input is refused."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from compressor import CompressionCallback, CompressionTrainer, Recipe, create_session, oneshot
from compressor.modifiers import SpinQuantModifier
from compressor.modifiers.transform.spinquant import infer_mapping_from_model, rotation_matrix
from compressor.modifiers.transform.spinquant.cayley import cayley_sgd_step, orthogonality_error
from compressor.modifiers.transform.spinquant.learn_batches import step_batches
from compressor.modifiers.transform.spinquant.learned import initial_rotations, learn_rotations
from compressor.modifiers.transform.spinquant.rotated_model import (
    LoopQuantizers,
    quantized_linears,
    quantized_loss,
    rotation_plan,
)
from conftest import tiny_llama_config
from training_runs import make_trainer
from training_runs import model as training_model

W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}
A4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _llama():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _learnable(**overrides):
    values = dict(learnable=True, learn_steps=8, learn_weights=W4, learn_activations=A4)
    values.update(overrides)
    return SpinQuantModifier(**values)


def _calibrate(model, modifier, batches):
    with create_session() as session:
        session.initialize(model, [modifier])
        session.calibration_epoch_start(batches)
        session.calibration_epoch_end()
        session.finalize()


# ---------------------------------------------------------------- the optimizer
def test_cayley_sgd_stays_orthogonal_and_descends():
    """Minimise ||X - T||^2 over orthogonal X: every iterate stays orthogonal, the loss falls."""
    gen = torch.Generator().manual_seed(0)
    target = rotation_matrix("random-matrix", 32, generator=gen)
    x = rotation_matrix("random-matrix", 32, generator=gen)
    buffer = None
    losses = []
    for _ in range(300):
        losses.append((x - target).pow(2).sum().item())
        x, buffer = cayley_sgd_step(x, 2 * (x - target), buffer, lr=0.1, momentum=0.5)
        assert orthogonality_error(x) < 1e-10
    assert losses[-1] < 0.1 * losses[0]
    assert all(b <= a + 1e-9 for a, b in zip(losses[50:], losses[51:], strict=False))


# ---------------------------------------------------------------- training on a tiny model
def test_training_lowers_the_quantized_loss_of_a_tiny_model():
    # unit norms (rotations are exact without fusing them) and weights large enough that the
    # logits are far from uniform, so the quantization error shows in the loss
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.2)).eval()
    plan = rotation_plan(model, infer_mapping_from_model(model), ["R1", "R2"])
    assert {side.key for side in plan} == {"R1", "R2:0", "R2:1"}
    start = initial_rotations(plan, "hadamard", {"R1": 32, "R2": 8})
    quantizers = LoopQuantizers(weights=None, activations=None)
    batch = {"input_ids": IDS}
    # without quantizers the loss does not depend on the rotations
    plain = model(IDS, labels=IDS).loss
    assert abs(quantized_loss(model, plan, start, batch, quantizers).item() - plain.item()) < 1e-4

    quantizers = LoopQuantizers(_learnable().learn_weights, _learnable().learn_activations)
    result = learn_rotations(model, plan, start, [batch], quantizers, steps=40, lr=1.0)
    before = quantized_loss(model, plan, start, batch, quantizers).item()
    after = quantized_loss(model, plan, result.rotations, batch, quantizers).item()
    assert after < before - 0.05
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert all(orthogonality_error(r) < 1e-5 for r in result.rotations.values())
    assert not torch.allclose(result.rotations["R1"], start["R1"], atol=1e-3)
    assert all(not p.grad_fn and p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- sequences per step
def _tiny_setup():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.2)).eval()
    plan = rotation_plan(model, infer_mapping_from_model(model), ["R1", "R2"])
    start = initial_rotations(plan, "random-hadamard", {"R1": 32, "R2": 8}, randomize=True)
    return (
        model,
        plan,
        start,
        LoopQuantizers(
            weights=_learnable().learn_weights, activations=_learnable().learn_activations
        ),
    )


def test_rows_regrouped_per_step_train_as_the_same_rows_batched(token_batches):
    """Four steps of two rows regrouped from one-row batches take the very steps (losses and
    rotations) that batches of those two rows take, and differ from one row per step."""
    model, plan, start, quantizers = _tiny_setup()
    singles = [{"input_ids": row[None]} for batch in token_batches for row in batch["input_ids"]]
    regrouped = learn_rotations(
        model, plan, start, singles, quantizers, steps=4, lr=1.0, batch_rows=2
    )
    batched = learn_rotations(model, plan, start, token_batches, quantizers, steps=4, lr=1.0)
    one_row = learn_rotations(model, plan, start, singles, quantizers, steps=4, lr=1.0)
    assert regrouped.losses == pytest.approx(batched.losses, abs=1e-6)
    for key, rotation in batched.rotations.items():
        assert (regrouped.rotations[key] - rotation).abs().max() < 1e-9
        assert orthogonality_error(regrouped.rotations[key]) < 1e-10
    assert abs(one_row.losses[1] - batched.losses[1]) > 1e-4


def test_rows_of_different_lengths_are_padded_out_of_the_loss():
    """Rows of 16 and 10 tokens (one with its own mask) in one step: right-padded, masked, and
    the step's loss is the token-weighted mean of each row's own loss. (Weights quantized
    only: the masked attention's last-bit differences would flip some 4-bit activation
    roundings, and each flip moves the loss far more than the padding could.)"""
    model, plan, start, quantizers = _tiny_setup()
    quantizers = LoopQuantizers(weights=quantizers.weights)
    long, short = IDS[0], IDS[1, :10]
    masked = {"input_ids": IDS[1:2, :12], "attention_mask": torch.tensor([[1] * 10 + [0] * 2])}
    batch = next(step_batches([{"input_ids": long[None]}, masked], rows=2))
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].tolist() == [[1] * 16, [1] * 10 + [0] * 6]
    assert torch.equal(batch["input_ids"][1, :10], short)
    both = quantized_loss(model, plan, start, batch, quantizers).item()
    each = [
        quantized_loss(model, plan, start, {"input_ids": ids[None]}, quantizers).item()
        for ids in (long, short)
    ]
    assert abs(both - (15 * each[0] + 9 * each[1]) / 24) < 1e-5
    # rows of one length and no mask stack as they are
    plain = next(step_batches([{"input_ids": IDS}], rows=3))
    assert set(plain) == {"input_ids"} and torch.equal(plain["input_ids"][2], IDS[0])


# ---------------------------------------------------------------- through the lifecycle
def test_learned_rotations_fuse_exactly_and_stay_orthogonal(token_batches):
    model = _llama()
    expected = model(IDS).logits
    modifier = _learnable(randomize=True)
    _calibrate(model, modifier, token_batches)
    learned = modifier.learned
    assert learned is not None and len(learned.losses) == 8
    assert set(learned.rotations) == {"R1", "R2:0", "R2:1"}
    assert all(orthogonality_error(r) < 1e-5 for r in learned.rotations.values())
    assert (model(IDS).logits - expected).abs().max() < 1e-4


def test_learned_r1_r2_compose_with_the_online_r4(token_batches):
    model = _llama()
    expected = model(IDS).logits
    modifier = _learnable(rotations=["R1", "R2", "R4"])
    _calibrate(model, modifier, token_batches)
    assert set(modifier.learned.rotations) == {"R1", "R2:0", "R2:1"}  # R4 is not learned
    down = model.model.layers[0].mlp.down_proj
    assert any("R4" in name for name, _ in down.named_modules())  # the online Hadamard
    assert (model(IDS).logits - expected).abs().max() < 1e-4
    # R4 is in the loop: down_proj's quantized input is rotated from the first step on, so
    # the first loss differs from that of the same run without R4
    without = _learnable(rotations=["R1", "R2"])
    _calibrate(_llama(), without, token_batches)
    assert abs(modifier.learned.losses[0] - without.learned.losses[0]) > 1e-4


def test_oneshot_learns_on_its_calibration_data(token_batches):
    from datasets import Dataset

    model = _llama()
    expected = model(IDS).logits
    rows = [row for batch in token_batches for row in batch["input_ids"].tolist()]
    modifier = _learnable(rotations=["R1"])
    compressed = oneshot(model, [modifier], dataset=Dataset.from_dict({"input_ids": rows}))
    assert modifier.learned is not None and set(modifier.learned.rotations) == {"R1"}
    assert (compressed(IDS).logits - expected).abs().max() < 1e-4


@pytest.mark.parametrize("observing", [False, True])
def test_oneshot_runs_no_calibration_pass_that_nothing_observes(token_batches, observing):
    """Alone (or with a dynamic-activation quantizer, which needs no data), learned rotations
    use the data only at calibration start: the decoder layers run exactly the learning
    steps' forwards, no layer-by-layer pass after, and the model is the one the sequential
    pass gives. With a modifier that observes (static input ranges), the pass still runs:
    every layer's first Linear sees the data again."""
    from datasets import Dataset

    from compressor.modifiers import QuantizationModifier

    model = _llama()
    rows = [row for batch in token_batches for row in batch["input_ids"].tolist()]
    calls = []
    for layer in model.model.layers:
        layer.self_attn.q_proj.register_forward_pre_hook(lambda *_: calls.append(1))
    activations = dict(A4, dynamic=not observing)
    if observing:
        activations.update(strategy="tensor", observer="minmax")

    def quantizer():
        return QuantizationModifier(
            ignore=["lm_head"],
            config_groups={"g": {"targets": ["Linear"], "input_activations": activations}},
        )

    modifier = _learnable(learn_steps=3)
    dataset = Dataset.from_dict({"input_ids": rows})
    oneshot(model, [modifier, quantizer()], dataset=dataset)
    layers = len(model.model.layers)
    assert len(modifier.learned.losses) == 3
    # the pass may merge batches and stop forwards early: it runs, is all that is fixed
    assert len(calls) > layers * 3 if observing else len(calls) == layers * 3
    if not observing:
        with_pass = _llama()
        recipe = [_learnable(learn_steps=3), quantizer()]
        oneshot(with_pass, recipe, dataset=dataset, pipeline="sequential")
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, with_pass(IDS).logits)


def test_learn_batch_size_regroups_oneshots_calibration_rows(token_batches):
    """learn_batch_size=2 on one-row calibration batches trains as oneshot's batch_size=2 does
    (the same losses), while the pipeline's own batches keep their size."""
    from datasets import Dataset

    rows = [row for batch in token_batches for row in batch["input_ids"].tolist()]
    dataset = Dataset.from_dict({"input_ids": rows})
    regrouped, batched = _learnable(learn_batch_size=2), _learnable()
    oneshot(_llama(), [regrouped], dataset=dataset, batch_size=1)
    oneshot(_llama(), [batched], dataset=dataset, batch_size=2)
    assert regrouped.learned.losses == pytest.approx(batched.learned.losses, abs=1e-6)
    one_row = _learnable()
    oneshot(_llama(), [one_row], dataset=dataset, batch_size=1)
    assert abs(one_row.learned.losses[1] - batched.learned.losses[1]) > 1e-4


def test_under_the_trainer_rotations_are_learned_from_the_training_batches(tmp_path):
    model = training_model()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
    callback = CompressionCallback([_learnable(start=0)])
    # learning rate 0: training leaves the weights alone, so only the rotations changed them
    trainer = make_trainer(model, callback, tmp_path, cls=CompressionTrainer, learning_rate=0.0)
    trainer.train()
    (modifier,) = callback.modifiers
    assert modifier.learned is not None and len(modifier.learned.losses) == 8
    assert all(orthogonality_error(r) < 1e-5 for r in modifier.learned.rotations.values())
    model.eval()
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max() < 1e-4
    assert not torch.allclose(
        model.model.embed_tokens.weight, training_model().model.embed_tokens.weight
    )


# ---------------------------------------------------------------- bad input
def test_learnable_without_calibration_data_is_refused():
    with pytest.raises(ValueError, match="SpinQuantModifier need\\(s\\) calibration data"):
        oneshot(_llama(), [_learnable()])
    model = _llama()
    with create_session() as session:
        session.initialize(model, [_learnable()])
        with pytest.raises(ValueError, match="learnable=True.*without data"):
            session.calibration_epoch_start()
    assert _learnable().requires_calibration_data()
    assert not SpinQuantModifier().requires_calibration_data()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"learnable": True}, "needs a quantizer in the loop"),
        ({"learn_steps": 5}, "learn_steps set but learnable is False"),
        (
            {"learnable": True, "learn_weights": W4, "transform_config": {"config_groups": {}}},
            "learnable=True with transform_config",
        ),
        (
            {
                "learnable": True,
                "learn_activations": {**A4, "strategy": "tensor", "dynamic": False},
            },
            "learn_activations.dynamic must be true",
        ),
        ({"learnable": True, "learn_weights": W4, "learn_steps": 0}, "learn_steps"),
        ({"learnable": True, "learn_weights": W4, "learn_lr": -1}, "learn_lr"),
        ({"learnable": True, "learn_weights": W4, "learn_momentum": 1.0}, "learn_momentum"),
        ({"learnable": True, "learn_weights": W4, "learn_batch_size": 0}, "learn_batch_size"),
        ({"learn_batch_size": 8}, "learn_batch_size set but learnable is False"),
        (
            {"learnable": True, "learn_weights": W4, "transform_block_size": 16},
            "learnable=True with transform_block_size",
        ),
        ({"learnable": True, "learn_weights": W4, "rotations": ["R4"]}, "has neither"),
    ],
)
def test_bad_learning_arguments_fail_at_parse_time(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        SpinQuantModifier(**kwargs)


def test_learning_arguments_round_trip_through_a_recipe():
    recipe = Recipe.from_yaml(
        """
spinquant_stage:
  rotation_modifiers:
    SpinQuantModifier:
      learnable: true
      learn_steps: 50
      learn_lr: 1.0
      learn_momentum: 0.5
      learn_batch_size: 8
      learn_weights: {num_bits: 4, type: int, symmetric: true, strategy: channel}
"""
    )
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    modifier = again.modifiers[0]
    assert modifier.learn_steps == 50 and modifier.learn_weights.num_bits == 4
    assert modifier.learn_batch_size == 8


def test_the_loop_computes_the_loss_of_the_model_it_fuses():
    """The rotated weights the loss sees are those fusion writes: the loop's weight-quantized
    loss equals the loss of the fused model with its Linears' weights fake-quantized (in
    float64, where the loop's and the fusion's products agree to far below a rounding step;
    the loop's cross-entropy itself is computed in float32)."""
    import copy

    from compressor.modifiers.quantization.fake_quant import fake_quantize_weight
    from compressor.modifiers.transform.spinquant.learned import fuse_rotations
    from compressor.modifiers.transform.spinquant.rotated_model import quantized_linears

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.2)).eval().double()
    plan = rotation_plan(model, infer_mapping_from_model(model), ["R1", "R2"])
    gen = torch.Generator().manual_seed(0)
    rotations = {
        side.key: rotation_matrix("random-matrix", 32 if side.key == "R1" else 8, generator=gen)
        for side in plan
    }
    quantizers = LoopQuantizers(weights=_learnable().learn_weights)
    loop = quantized_loss(model, plan, rotations, {"input_ids": IDS}, quantizers)

    fused = copy.deepcopy(model)
    fused_plan = rotation_plan(fused, infer_mapping_from_model(fused), ["R1", "R2"])
    fuse_rotations(fused_plan, rotations)
    with torch.no_grad():
        for name, linear in quantized_linears(fused).items():
            linear.weight.copy_(fake_quantize_weight(linear.weight, quantizers.weights, where=name))
        assert abs(fused(IDS, labels=IDS).loss.item() - loop.item()) < 1e-5


def _r4_double_llama():
    """The tiny Llama in float64 with the online R4 on down_proj (a Hadamard of order 64)."""
    from compressed_tensors.transform import TransformConfig

    from compressor.modifiers.transform.spinquant.online import r4_scheme
    from compressor.modifiers.transform.spinquant.online_attention import apply_online_rotations

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.2)).eval().double()
    scheme = r4_scheme(
        model,
        ["re:.*down_proj$"],
        "hadamard",
        block_size=None,
        randomize=False,
        precision=torch.float64,
    )
    apply_online_rotations(model, TransformConfig(config_groups={"R4": scheme}))
    return model


def _frozen_r4_llama_and_random_starts():
    """The float64 tiny Llama with R4, its weights frozen, its R1/R2 plan and random
    orthogonal starts (seeded)."""
    model = _r4_double_llama()
    for param in model.parameters():
        param.requires_grad_(False)
    plan = rotation_plan(model, infer_mapping_from_model(model), ["R1", "R2"])
    gen = torch.Generator().manual_seed(0)
    start = {
        side.key: rotation_matrix("random-matrix", 32 if side.key == "R1" else 8, generator=gen)
        for side in plan
    }
    return model, plan, start


@pytest.mark.parametrize("masked", [False, True])
def test_rotating_activations_takes_the_steps_rotating_weights_takes(masked):
    """With activations only in the loop, the loss rotates the activations rather than the
    weights (far cheaper): in float64 its loss, its gradient and the Cayley steps they give
    equal those of the rotated weights, with the online R4 in place and padding masked."""
    model, plan, start = _frozen_r4_llama_and_random_starts()
    quantizers = LoopQuantizers(activations=_learnable().learn_activations)
    batch = {"input_ids": IDS}
    if masked:
        batch["attention_mask"] = torch.ones_like(IDS).index_fill_(1, torch.arange(12, 16), 0)
    paths = {}
    for rotate_weights in (True, False):
        current = {k: r.clone().requires_grad_(True) for k, r in start.items()}
        losses = []
        for _ in range(3):
            loss = quantized_loss(
                model, plan, current, batch, quantizers, rotate_weights=rotate_weights
            )
            grads = torch.autograd.grad(loss, list(current.values()))
            losses.append(loss.item())
            current = {
                k: cayley_sgd_step(r.detach(), g, None, 0.5)[0].requires_grad_(True)
                for (k, r), g in zip(current.items(), grads, strict=True)
            }
        paths[rotate_weights] = (losses, current)
    (by_weights, rotated_weights), (by_inputs, rotated_inputs) = paths[True], paths[False]
    assert by_inputs == pytest.approx(by_weights, abs=1e-6)  # the loss is taken in float32
    assert by_weights[0] != pytest.approx(by_weights[-1], abs=1e-4)  # the steps moved it
    for key, rotation in rotated_weights.items():
        assert (rotated_inputs[key] - rotation).abs().max() < 1e-9
        assert (rotation - start[key]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="rotate_weights=False with a weight quantizer"):
        quantized_loss(
            model,
            plan,
            start,
            batch,
            LoopQuantizers(weights=_learnable().learn_weights),
            rotate_weights=False,
        )


def test_tied_embeddings_must_be_untied_before_planning():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    with pytest.raises(ValueError, match="share one weight \\(tied embeddings\\)"):
        rotation_plan(model, infer_mapping_from_model(model), ["R1"])


# ---------------------------------------------------------------- the gradient, checked
def _smooth_quantizer(kind):
    """A stand-in for the fake quantizer whose derivative is known exactly: ``sin``, a smooth
    coordinate-wise distortion differentiated by autograd; ``noise``, the input plus a fixed
    noise tensor per location through the straight-through estimator (whose identity
    gradient is then the true one)."""
    from compressor.modifiers.quantization.fake_quant import straight_through

    noises = {}

    def quantize(x, _args, _role, where):
        if kind == "sin":
            return x + 0.05 * torch.sin(5 * x)
        key = (where, tuple(x.shape))
        if key not in noises:
            gen = torch.Generator().manual_seed(len(noises))
            noises[key] = 0.05 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return straight_through(x, x + noises[key])

    return quantize


@pytest.mark.parametrize("loss", ["cross_entropy", "kl_to_full_precision"])
@pytest.mark.parametrize(
    ("kind", "rotate_weights"), [("sin", True), ("sin", False), ("noise", False)]
)
def test_the_cayley_step_descends_at_the_rate_its_gradient_predicts(
    monkeypatch, kind, rotate_weights, loss
):
    """In float64, with the quantizer replaced by a smooth stand-in, the loss along the curve
    of a Cayley step ``X(a)`` (every rotation stepping together, the online R4 in place) has
    the derivative the gradient predicts: ``d/da L(X(a)) = -sum ||W||_F^2`` at 0, with
    ``W = (G X^T - X G^T) / 2``; central finite differences agree to 1e-6 relative (measured:
    1e-8 to 1e-11 at this step, bench/results/2026-12-02-spinquant-learning-loss.md)."""
    from transformers.models.llama import modeling_llama

    from compressor.modifiers.transform.spinquant import rotated_model

    def rms_norm_in_float64(self, x):  # transformers' computes in float32: noise at 1e-8
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_in_float64)
    monkeypatch.setattr(rotated_model, "_fake_quant", _smooth_quantizer(kind))
    model, plan, start = _frozen_r4_llama_and_random_starts()
    quantizers = LoopQuantizers(
        weights=_learnable().learn_weights if rotate_weights else None,
        activations=_learnable().learn_activations,
    )
    batch = {"input_ids": IDS}

    def value(rotations):
        return quantized_loss(
            model, plan, rotations, batch, quantizers, rotate_weights=rotate_weights, loss=loss
        )

    current = {k: r.clone().requires_grad_(True) for k, r in start.items()}
    grads = dict(
        zip(current, torch.autograd.grad(value(current), list(current.values())), strict=True)
    )
    predicted = -sum(
        (0.5 * (g @ start[k].T - start[k] @ g.T)).pow(2).sum() for k, g in grads.items()
    ).item()

    def along(a):
        with torch.no_grad():
            return value({k: cayley_sgd_step(start[k], g, None, a)[0] for k, g in grads.items()})

    h = 1e-4
    measured = ((along(h) - along(-h)) / (2 * h)).item()
    assert predicted < -1e-5  # the stand-in makes the loss depend on the rotations
    assert measured == pytest.approx(predicted, rel=1e-6)


# ---------------------------------------------------------------- the KL loss
def test_the_kl_loss_is_the_divergence_from_the_full_precision_model():
    """``kl_to_full_precision``: the mean over the unmasked tokens of KL(p_full || p_quant),
    computed directly from the fused, fake-quantized model's logits (the fused quantizer, as
    the loop's: in float64 compressed-tensors' own rounds a few values the other way; in
    float32 they agree bit for bit); zero without quantizers whatever the rotations (they
    leave the full-precision model unchanged)."""
    import copy

    from compressor.modifiers.quantization.fake_quant import fused_fake_quantize
    from compressor.modifiers.transform.spinquant.learned import fuse_rotations

    model = _r4_double_llama()
    plan = rotation_plan(model, infer_mapping_from_model(model), ["R1", "R2"])
    gen = torch.Generator().manual_seed(0)
    rotations = {
        side.key: rotation_matrix("random-matrix", 32 if side.key == "R1" else 8, generator=gen)
        for side in plan
    }
    mask = torch.ones_like(IDS).index_fill_(1, torch.arange(12, 16), 0)
    batch = {"input_ids": IDS, "attention_mask": mask}
    none = LoopQuantizers()
    assert quantized_loss(model, plan, rotations, batch, none, loss="kl_to_full_precision") < 1e-12

    quantizers = LoopQuantizers(activations=_learnable().learn_activations)
    loop = quantized_loss(model, plan, rotations, batch, quantizers, loss="kl_to_full_precision")
    with torch.no_grad():
        full = torch.log_softmax(model(IDS, attention_mask=mask).logits, -1)
        fused = copy.deepcopy(model)
        fuse_rotations(
            rotation_plan(fused, infer_mapping_from_model(fused), ["R1", "R2"]), rotations
        )
        args = quantizers.activations
        for name, linear in quantized_linears(fused).items():
            linear.register_forward_pre_hook(
                lambda _m, i, a=args, n=name: (
                    fused_fake_quantize(i[0], a, "activation", n),
                    *i[1:],
                )
            )
        quant = torch.log_softmax(fused(IDS, attention_mask=mask).logits, -1)
    per_token = (full.exp() * (full - quant)).sum(-1)
    direct = per_token[mask.bool()].mean()
    assert direct > 1e-4
    assert loop.item() == pytest.approx(direct.item(), rel=1e-6)
    with pytest.raises(ValueError, match="loss must be one of cross_entropy, kl_to_full_precision"):
        quantized_loss(model, plan, rotations, batch, quantizers, loss="mse")


def test_learning_on_the_kl_lowers_it_on_a_fixed_batch():
    """At 6 bits (at 4 the tiny model's loss is too rough in the rotations: 20 steps move it
    by -7% to +5% depending on the rate), 20 steps on one batch lower its KL by a quarter."""
    from compressed_tensors.quantization import QuantizationArgs

    model = _r4_double_llama()
    plan = rotation_plan(model, infer_mapping_from_model(model), ["R1", "R2"])
    start = initial_rotations(plan, "hadamard", {"R1": 32, "R2": 8})
    quantizers = LoopQuantizers(activations=QuantizationArgs(**dict(A4, num_bits=6)))
    batch = {"input_ids": IDS}
    result = learn_rotations(
        model, plan, start, [batch], quantizers, steps=20, lr=0.1, loss="kl_to_full_precision"
    )
    before = quantized_loss(model, plan, start, batch, quantizers, loss="kl_to_full_precision")
    after = quantized_loss(
        model, plan, result.rotations, batch, quantizers, loss="kl_to_full_precision"
    )
    assert after < 0.85 * before
    assert all(orthogonality_error(r) < 1e-10 for r in result.rotations.values())

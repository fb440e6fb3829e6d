import pytest
import torch
from pruning_helpers import calibrate, train, zero_fraction

from compressor import CompressionSession, Recipe, RecipeError
from compressor.modifiers import SparsePruningModifier

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, 12), generator=gen)} for _ in range(n)]


def _targets(model):
    return {n: m for n, m in model.named_modules() if n.endswith(LINEARS)}


def test_training_schedule_ramps_holds_zeros_and_reaches_the_density(tiny_llama):
    model = tiny_llama
    targets = _targets(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    modifier = SparsePruningModifier(density=0.3, init_density=0.9, start=1, end=4, update=1)
    session = CompressionSession()
    session.initialize(model=model, recipe=[modifier], optimizer=opt, batches_per_step=2)
    seen = []

    def check():
        layer = targets["model.layers.0.mlp.up_proj"]
        seen.append(zero_fraction(layer.weight))
        for module in targets.values():  # every zero holds through AdamW's decay and momentum
            mask = modifier._holder.mask_of(module.weight)
            if mask is not None:
                assert (module.weight[~mask] == 0).all()

    train(model, session, opt, _batches(12), accumulate=2, after_step=check)
    session.finalize()
    # seen[i] follows optimizer step i + 1, under the mask set at step i: dense at step 0,
    # 10% sparse at step 1 (init_density 0.9), cubic ramp to 70% at step 4 (end), then held
    assert seen[0] == 0.0 and seen[1] == pytest.approx(0.1, abs=1e-3)
    assert seen[1] < seen[2] < seen[3] < seen[4] == pytest.approx(0.7, abs=1e-3) == seen[5]
    for name, module in targets.items():
        assert zero_fraction(module.weight) == pytest.approx(0.7, abs=1e-3), name
    assert zero_fraction(model.lm_head.weight) == 0.0
    assert modifier.num_hooks == 0


def test_gradients_of_pruned_weights_are_zero_in_every_micro_batch(tiny_llama):
    model = tiny_llama
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = CompressionSession()
    session.initialize(
        model=model, recipe=[SparsePruningModifier(sparsity=0.5, start=0)], optimizer=opt
    )
    layer = model.model.layers[1].mlp.down_proj
    mask = layer.weight != 0
    session.batch_start()
    model(**_batches(1)[0], labels=_batches(1)[0]["input_ids"]).loss.backward()
    assert (layer.weight.grad[~mask] == 0).all() and (layer.weight.grad[mask] != 0).any()
    session.batch_end()
    session.finalize()


def test_one_shot_2_4_keeps_two_of_every_four(tiny_llama, token_batches):
    model = tiny_llama
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    session = CompressionSession()
    session.initialize(model=model, recipe=[SparsePruningModifier(mask_structure="2:4")])
    calibrate(model, session, token_batches)
    session.finalize()
    for name, module in _targets(model).items():
        groups = module.weight.detach().view(-1, 4)
        assert ((groups != 0).sum(dim=1) == 2).all(), name
    after = model.model.layers[0].self_attn.q_proj.weight.detach()
    kept = after.view(-1, 4) != 0
    # the kept pair is the larger pair in magnitude
    assert (
        before.abs().view(-1, 4)[kept].view(-1, 2).min(1).values
        >= before.abs().view(-1, 4)[~kept].view(-1, 2).max(1).values
    ).all()
    assert torch.equal(after[after != 0], before[after != 0])


def test_activation_scores_follow_the_input_norms(tiny_llama, token_batches):
    model = tiny_llama
    modifier = SparsePruningModifier(
        density=0.5, method="activation", targets=["re:.*layers\\.0\\.mlp\\.down_proj"]
    )
    assert modifier.requires_calibration_data()
    layer = model.model.layers[0].mlp.down_proj
    inputs = []
    handle = layer.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach()))
    weight = layer.weight.detach().clone()
    session = CompressionSession()
    session.initialize(model=model, recipe=[modifier])
    calibrate(model, session, token_batches)
    session.finalize()
    handle.remove()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
    expected_scores = weight.abs() * x.pow(2).sum(0).sqrt()
    k = weight.numel() // 2
    threshold = expected_scores.flatten().kthvalue(weight.numel() - k + 1).values
    assert torch.equal(layer.weight != 0, expected_scores >= threshold)
    # differs from plain magnitude, so the input norms mattered
    assert not torch.equal(layer.weight != 0, weight.abs() >= weight.abs().median())


def test_topk_scores_reach_an_optimizer_created_after_initialize(tiny_llama):
    model = tiny_llama
    modifier = SparsePruningModifier(
        density=0.5, init_density=0.5, method="topk", start=0, end=3, targets=["re:.*mlp\\.up_proj"]
    )
    session = CompressionSession()
    session.initialize(model=model, recipe=[modifier])
    # documented order: initialize the session first, then build the optimizer
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scores = [sm[0].scores for sm in modifier.scorer.score_masks.values()]
    assert len(scores) == 2
    param_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(s) in param_ids for s in scores)
    start_scores = [s.detach().clone() for s in scores]
    layer = model.model.layers[0].mlp.up_proj

    def check():
        assert zero_fraction(layer.weight) == pytest.approx(0.5)

    # optimizer created after initialize: step the schedule by batches
    train(model, session, opt, _batches(5), after_step=check)
    assert any(not torch.equal(a, s.detach()) for a, s in zip(start_scores, scores, strict=True))
    session.finalize()
    # frozen at end=3: plain parameter again, zeros in place
    assert type(layer) is torch.nn.Linear and "weight" in dict(layer.named_parameters())
    assert zero_fraction(layer.weight) == pytest.approx(0.5)


def test_the_session_adds_topk_scores_to_the_optimizer_it_was_given(tiny_llama):
    model = tiny_llama
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    groups_before = len(opt.param_groups)
    modifier = SparsePruningModifier(
        mask_structure="2:4", method="topk", start=0, targets=["re:.*layers\\.1\\.mlp\\.gate_proj"]
    )
    session = CompressionSession()
    session.initialize(model=model, recipe=[modifier], optimizer=opt)
    assert len(opt.param_groups) == groups_before + 1
    train(model, session, opt, _batches(2))
    layer = model.model.layers[1].mlp.gate_proj
    assert ((layer.weight.detach().view(-1, 4) != 0).sum(1) == 2).all()
    session.finalize()
    assert ((layer.weight.detach().view(-1, 4) != 0).sum(1) == 2).all()


@pytest.mark.parametrize(
    "args, message",
    [
        ({"density": 0.0}, r"density must be in \(0, 1\]"),
        ({"density": 1.5}, r"density must be in \(0, 1\]"),
        ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\)"),
        ({"sparsity": 0.5, "density": 0.5}, "density or sparsity, not both"),
        ({"density": 0.5, "method": "movement"}, "'l1', 'topk', 'activation' or 'snip_momentum'"),
        ({}, "density \\(or sparsity\\) is required"),
        ({"mask_structure": "2:4", "density": 0.3}, "contradicts mask_structure"),
        ({"mask_structure": "4:2"}, "'N:M' with 0 < N < M"),
        ({"density": 0.5, "method": "activation", "start": 0}, "leave start unset"),
        ({"density": 0.5, "init_density": 0.3, "start": 0, "end": 2}, "init_density"),
    ],
)
def test_bad_arguments_fail_at_parse_time(args, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"modifiers": [{"SparsePruningModifier": args}]})


def test_a_target_that_is_not_a_weight_layer_is_named(tiny_llama):
    session = CompressionSession()
    with pytest.raises(ValueError, match="model.norm is a LlamaRMSNorm"):
        session.initialize(
            model=tiny_llama, recipe=[SparsePruningModifier(density=0.5, targets=["model.norm"])]
        )


def test_recipe_round_trip():
    recipe = Recipe.from_yaml(
        "modifiers:\n  - SparsePruningModifier: {sparsity: 0.25, start: 0, end: 4, update: 2,"
        " ramp: linear, method: topk, ignore: ['re:.*o_proj']}\n"
    )
    again = Recipe.from_yaml(recipe.to_yaml())
    (a,), (b,) = recipe.modifiers, again.modifiers
    assert a.model_dump() == b.model_dump() and b.density == 0.75


def test_checkpoint_state_restores_masks_and_scores_and_rejects_another_recipe(tiny_llama):
    def run(method, model):
        modifier = SparsePruningModifier(density=0.5, method=method, start=0, targets=["Linear"],
                                         ignore=["lm_head"])  # fmt: skip
        session = CompressionSession()
        session.initialize(model=model, recipe=[modifier])
        return modifier

    saved = run("l1", tiny_llama).state_dict()
    assert len(saved["masks"]) == 14 and not saved["scores"] and saved["applied_density"] == 0.5
    torch.manual_seed(1)
    other = type(tiny_llama)(tiny_llama.config)  # different weights, so l1 picks other masks
    restored = run("l1", other)
    restored.load_state_dict(saved)
    for name, module in _targets(other).items():
        mask = restored._holder.mask_of(module.weight)
        assert torch.equal(mask, _targets(tiny_llama)[name].weight != 0), name
        assert not module.weight[~mask].any(), name  # held from now on

    topk = run("topk", type(tiny_llama)(tiny_llama.config))
    scores = {k: v + 1.0 for k, v in topk.state_dict()["scores"].items()}
    objects = [m[0].scores for m in topk.scorer.score_masks.values()]
    topk.load_state_dict({**topk.state_dict(), "scores": scores})
    held = topk.scorer.score_masks.values()
    assert all(s is m[0].scores for s, m in zip(objects, held, strict=True))
    assert torch.equal(objects[0], scores["0"])  # copied into the same Parameter
    with pytest.raises(ValueError, match=r"holds learnable TopK scores, but this run has none"):
        run("l1", type(tiny_llama)(tiny_llama.config)).load_state_dict({"scores": scores})
    with pytest.raises(ValueError, match=r"state for couplings \['99'\], but this run prunes 14"):
        restored.load_state_dict({"masks": {"99": torch.ones(1, dtype=torch.bool)}})


def test_masks_ramp_on_the_latent_weights_of_quantization_aware_training(tiny_llama):
    """QAT parametrizes the weights; masks recomputed during its training score and hold the
    latent Parameter underneath (reading ``module.weight`` would give a fresh fake-quantized
    tensor on every read, which no mask can hold)."""
    from torch.nn.utils import parametrize

    from compressor.modifiers import QuantizationModifier

    model = tiny_llama
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    groups = {"g": {"targets": ["re:.*_proj$"], "weights": weights}}
    sparse = SparsePruningModifier(
        density=0.5, init_density=0.8, start=0, end=3, update=1, targets=["re:.*_proj$"]
    )
    session = CompressionSession()
    session.initialize(
        model=model,
        recipe=[sparse, QuantizationModifier(config_groups=groups, start=0)],
        optimizer=opt,
    )
    up = _targets(model)["model.layers.0.mlp.up_proj"]
    latent = []

    def check():
        assert parametrize.is_parametrized(up, "weight")
        latent.append(zero_fraction(up.parametrizations.weight.original))

    train(model, session, opt, _batches(5), after_step=check)
    session.finalize()
    assert latent[0] == pytest.approx(0.2, abs=1e-3) and latent[-1] == pytest.approx(0.5, abs=1e-3)
    assert latent[0] < latent[1] < latent[2]
    for name, module in _targets(model).items():
        assert zero_fraction(module.weight) == pytest.approx(0.5, abs=1e-3), name

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from compressor import CompressionSession, Recipe, RecipeError, oneshot
from compressor.modifiers import LayerReductionModifier, OutputDistillationModifier
from compressor.modifiers.layer_reduction import angular_distance, keep_decoder_layers
from conftest import tiny_llama_config


@pytest.fixture
def llama4():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4)).eval()


def _ids(seed=0, length=16):
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def test_kept_layers_hold_the_teachers_weights_and_the_model_reloads(llama4, tmp_path):
    teacher = copy.deepcopy(llama4)
    session = CompressionSession()
    session.initialize(
        model=llama4, recipe=[LayerReductionModifier(teacher_layer=[0, 2], keep_number_layer=2)]
    )
    session.finalize()
    layers = llama4.model.layers
    assert len(layers) == 2 and llama4.config.num_hidden_layers == 2
    for new, old in ((0, 0), (1, 2)):
        for (name, p), (_, q) in zip(
            layers[new].named_parameters(),
            teacher.model.layers[old].named_parameters(),
            strict=True,
        ):
            assert torch.equal(p, q), name
        assert layers[new].self_attn.layer_idx == new
    params = sum(p.numel() for p in llama4.parameters())
    per_layer = sum(p.numel() for p in teacher.model.layers[0].parameters())
    assert params == sum(p.numel() for p in teacher.parameters()) - 2 * per_layer

    llama4.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, llama4(ids).logits)
    # generation uses the KV cache, which is indexed by the renumbered layer_idx
    out = reloaded.generate(ids, max_new_tokens=5, do_sample=False)
    again = llama4.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 21) and torch.equal(out, again)


def test_per_layer_config_lists_follow():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, layer_types=["full_attention", "sliding_attention", "full_attention"],
        use_sliding_window=True, sliding_window=8,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    keep_decoder_layers(model, [1, 2])
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert model.config.num_hidden_layers == 2
    assert model(_ids(length=12) % 64).logits.shape == (1, 12, 64)


def test_gpt2_drop_layers():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64)).eval()
    teacher = copy.deepcopy(model)
    session = CompressionSession()
    session.initialize(model=model, recipe=[LayerReductionModifier(drop_layers=[3, 1])])
    session.finalize()
    assert model.config.n_layer == 2 and len(model.transformer.h) == 2
    assert torch.equal(
        model.transformer.h[1].mlp.c_fc.weight, teacher.transformer.h[2].mlp.c_fc.weight
    )
    assert model.generate(_ids(length=4) % 64, max_new_tokens=3, do_sample=False).shape == (1, 7)


def _redundant_middle(model):
    with torch.no_grad():  # layers 1 and 2 add nothing to the residual stream
        for layer in model.model.layers[1:3]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize(
    "size, pipeline",
    [("num_layers_to_drop: 2", "basic"), ("keep_number_layer: 2", "sequential")],
)
def test_angular_strategy_drops_the_redundant_block_and_writes_it_back(llama4, size, pipeline):
    _redundant_middle(llama4)
    recipe = Recipe.from_yaml(
        "prune_stage:\n  depth_modifiers:\n    LayerReductionModifier: {strategy: angular, "
        + size
        + "}\n"
    )
    (modifier,) = recipe.modifiers
    assert modifier.requires_calibration_data()
    ids = [_ids(seed)[0].tolist() for seed in range(3)]
    from datasets import Dataset

    model = oneshot(llama4, recipe, Dataset.from_dict({"input_ids": ids}), pipeline=pipeline)
    assert len(model.model.layers) == 2
    assert modifier.dropped_layers == [1, 2]
    assert modifier.strategy == "angular"  # the fields stay the recipe as given
    again = Recipe.from_yaml(recipe.to_yaml()).modifiers[0]
    assert (again.strategy, again.drop_layers, again.num_layers_to_drop) == ("index", [1, 2], None)
    assert not again.requires_calibration_data()


def test_saved_recipe_after_an_angular_run_names_the_dropped_layers(llama4, tmp_path):
    from datasets import Dataset

    fresh = copy.deepcopy(_redundant_middle(llama4))
    recipe = Recipe.from_yaml(
        "prune_stage:\n  depth_modifiers:\n"
        "    LayerReductionModifier: {strategy: angular, keep_number_layer: 2}\n"
    )
    ids = [_ids(seed)[0].tolist() for seed in range(3)]
    oneshot(llama4, recipe, Dataset.from_dict({"input_ids": ids}), output_dir=tmp_path / "out")

    saved = Recipe.from_file(tmp_path / "out" / "recipe.yaml")
    (modifier,) = saved.modifiers
    assert (modifier.strategy, modifier.drop_layers, modifier.num_layers_to_drop) == (
        "index",
        [1, 2],
        None,
    )
    assert '"drop_layers": [1, 2]' in (tmp_path / "out" / "README.md").read_text()
    # the saved recipe reproduces the run without calibration data
    again = oneshot(fresh, saved)
    assert len(again.model.layers) == 2
    for name, weight in llama4.state_dict().items():
        assert torch.equal(weight, again.state_dict()[name]), name


def test_angular_distance():
    a = torch.randn(3, 5, 8)
    assert angular_distance(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert angular_distance(a, -a).item() == pytest.approx(1.0, abs=1e-6)
    assert angular_distance(a, 2 * a).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_lowers_the_student_teacher_gap(llama4):
    teacher = llama4
    student = copy.deepcopy(teacher).train()
    keep_decoder_layers(student, [0, 3])
    opt_params = None
    session = CompressionSession()
    recipe = [
        OutputDistillationModifier(
            start=0, temperature=2.0, hardness=1.0, hidden_weight=0.1, teacher_layer=[0, 3]
        )
    ]
    session.initialize(model=student, recipe=recipe, teacher_model=teacher)
    opt_params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(opt_params, lr=3e-3)
    ids = _ids(7, length=32)
    losses = []
    for _ in range(15):
        batch = {"input_ids": ids, "labels": ids}
        session.batch_start(batch_data=batch)
        task = student(**batch).loss
        loss = session.loss_calculated(task)
        assert not torch.equal(loss, task)  # distillation replaced the loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
        session.batch_end()
    session.finalize()
    assert losses[-1] < 0.5 * losses[0]
    assert all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize(
    "args, message",
    [
        ({}, "exactly one of teacher_layer"),
        ({"teacher_layer": [0], "drop_layers": [1]}, "exactly one of teacher_layer"),
        ({"teacher_layer": [0, 0]}, "distinct layer indices"),
        ({"teacher_layer": [0, 2], "keep_number_layer": 3}, r"keep_number_layer \(3\) differs"),
        ({"strategy": "angular"}, "exactly one of num_layers_to_drop or keep_number_layer"),
        (
            {"strategy": "angular", "num_layers_to_drop": 1, "keep_number_layer": 3},
            "exactly one of num_layers_to_drop",
        ),
        ({"strategy": "angular", "num_layers_to_drop": 1, "start": 0}, "leave start"),
        ({"strategy": "magic", "drop_layers": [0]}, "strategy"),
    ],
)
def test_bad_fields_are_rejected_at_parse_time(args, message):
    text = (
        "s_stage:\n  g_modifiers:\n    LayerReductionModifier: "
        + repr(args).replace("'", '"')
        + "\n"
    )
    with pytest.raises(RecipeError, match=message):
        Recipe.from_yaml(text)


@pytest.mark.parametrize(
    "modifier, message",
    [
        (
            LayerReductionModifier(teacher_layer=[0, 7]),
            r"teacher_layer: indices \[7\] out of range; the model has layers 0..3",
        ),
        (LayerReductionModifier(drop_layers=[0, 1, 2, 3]), "removes every layer"),
        (
            LayerReductionModifier(drop_layers=[0], keep_number_layer=2),
            r"keep_number_layer \(2\) differs",
        ),
        (
            LayerReductionModifier(drop_layers=[0], module_name_prefix="model.nope"),
            "module_name_prefix",
        ),
        (
            LayerReductionModifier(drop_layers=[0], other_module_name=["bert.pooler"]),
            "other_module_name",
        ),
        (LayerReductionModifier(strategy="angular", num_layers_to_drop=4), "must be below"),
        (OutputDistillationModifier(start=0), "needs a teacher"),
    ],
)
def test_bad_fields_against_the_model(llama4, modifier, message):
    with pytest.raises(ValueError, match=message):
        CompressionSession().initialize(model=llama4, recipe=[modifier])

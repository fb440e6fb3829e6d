"""SpinQuant's online rotation R4: exact in full precision, a Hadamard on down_proj's input,
the sizes it supports and the errors for those it does not."""

import math

import pytest
import torch
from compressed_tensors.transform import TransformConfig
from compressed_tensors.transform.factory.base import TransformBase
from pydantic import ValidationError
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from compressor import Recipe, create_session
from compressor.modifiers import SpinQuantModifier
from compressor.modifiers.transform.spinquant.online import (
    online_hadamard_type,
    online_part,
    split_transform_config,
    working_block_sizes,
)
from conftest import tiny_llama_config

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _randomise_norms(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _llama(**overrides):
    torch.manual_seed(0)
    return _randomise_norms(LlamaForCausalLM(tiny_llama_config(**overrides)).eval())


def _qwen2(**overrides):
    values = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    torch.manual_seed(0)
    return _randomise_norms(Qwen2ForCausalLM(Qwen2Config(**values)).eval())


def _oneshot(model, modifier):
    with create_session() as session:
        session.initialize(model, modifier)
        session.calibration_epoch_start()
        session.calibration_epoch_end()
        session.finalize()
    return model


@pytest.mark.parametrize(
    "build, width, kwargs, kind",
    [
        (_llama, 64, {}, "hadamard"),  # a power of two
        (_llama, 172, {}, "random-hadamard"),  # 43 * 4: a known order (stories260K's MLP)
        (_llama, 1536, {}, "random-hadamard"),  # 12 * 128 (SmolLM2's MLP)
        (_llama, 96, {"transform_block_size": 16}, "hadamard"),  # blocks of 16
        (_qwen2, 96, {}, "random-hadamard"),  # Qwen2: biased q/k/v
        (_qwen2, 96, {"transform_type": "random-hadamard", "randomize": False}, "random-hadamard"),
    ],
)
@pytest.mark.parametrize("rotations", [["R4"], ["R1", "R2", "R4"]])
def test_r4_leaves_the_full_precision_model_unchanged(build, width, kwargs, kind, rotations):
    if "transform_block_size" in kwargs and "R1" in rotations:
        kwargs = dict(kwargs, transform_block_size=16)  # R1 takes the block size too (32 / 16)
    model = build(intermediate_size=width)
    with torch.no_grad():
        reference = model(IDS).logits
    _oneshot(model, SpinQuantModifier(rotations=rotations, **kwargs))
    with torch.no_grad():
        rotated = model(IDS).logits
    torch.testing.assert_close(rotated, reference, atol=1e-4, rtol=0)
    scheme = model.transform_config.config_groups["R4"]
    assert scheme.type == kind and scheme.head_dim == kwargs.get("transform_block_size")
    assert [a.location for a in scheme.apply] == ["input", "weight_input"]
    transforms = [m for n, m in model.named_modules() if n.endswith("down_proj.R4_input")]
    assert len(transforms) == 2


def test_r4_multiplies_down_proj_inputs_by_a_hadamard_matrix_and_spreads_an_outlier():
    model = _llama(intermediate_size=64)
    with torch.no_grad():  # one MLP channel 50x larger than the others: an outlier
        model.model.layers[0].mlp.up_proj.weight[7] *= 50
    down = model.model.layers[0].mlp.down_proj
    seen = {}
    down.register_forward_hook(lambda _m, args, _out: seen.__setitem__("input", args[0]))
    with torch.no_grad():
        model(IDS)
    plain = seen["input"]
    _oneshot(model, SpinQuantModifier(rotations=["R4"]))
    with torch.no_grad():
        model(IDS)
    rotated = seen["input"]
    (transform,) = [m for m in down.modules() if isinstance(m, TransformBase)]
    matrix = transform.weight.double() / math.sqrt(64)
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(64, dtype=torch.float64))
    torch.testing.assert_close(matrix.abs(), torch.full_like(matrix, 1 / 8))
    torch.testing.assert_close(rotated.double(), plain.double() @ matrix, atol=1e-5, rtol=1e-5)

    def peak_over_rms(x):
        return (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean().item()

    assert peak_over_rms(rotated) < peak_over_rms(plain) / 3


def test_quantized_down_proj_quantizes_the_rotated_input():
    from compressor import oneshot
    from compressor.modifiers import QuantizationModifier

    model = _llama(intermediate_size=64)
    activations = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token"}
    quant = QuantizationModifier(
        ignore=["lm_head"],
        config_groups={
            "g": {"targets": ["Linear"], "input_activations": {**activations, "dynamic": True}}
        },
    )
    oneshot(model=model, recipe=[SpinQuantModifier(rotations=["R1", "R2", "R4"]), quant])
    down = model.model.layers[0].mlp.down_proj
    captured = {}
    down.register_forward_hook(lambda _m, args, out: captured.update(x=args[0], y=out))
    with torch.no_grad():
        model(IDS)
    x = captured["x"]  # what the Linear's forward received: the rotated input
    scale = x.abs().amax(-1, keepdim=True) / 7.5
    quantized = torch.clamp(torch.round(x / scale), -8, 7) * scale
    expected = torch.nn.functional.linear(quantized, down.weight)
    torch.testing.assert_close(captured["y"], expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- sizes and errors
def test_online_types_for_each_order():
    assert online_hadamard_type("hadamard", 256, "R4") == "hadamard"
    assert online_hadamard_type("hadamard", 1536, "R4") == "random-hadamard"
    assert online_hadamard_type("random-hadamard", 172, "R4") == "random-hadamard"
    assert working_block_sizes(50) == [2, 1]
    assert working_block_sizes(172)[:3] == [172, 4, 2]


def test_r4_on_a_width_without_a_hadamard_names_it_and_the_block_sizes_that_work():
    model = _llama(intermediate_size=50)  # 2 * 25: no Hadamard matrix of order 50
    modifier = SpinQuantModifier(rotations=["R4"])
    with (
        pytest.raises(ValueError, match=r"no Hadamard matrix of order 50.*dividing 50: \[2, 1\]"),
        create_session() as session,
    ):
        session.initialize(model, modifier)


def test_a_block_size_that_does_not_divide_the_width_names_the_sizes_that_work():
    model = _llama(intermediate_size=96)
    modifier = SpinQuantModifier(rotations=["R4"], transform_block_size=64)
    with (
        pytest.raises(ValueError, match=r"transform_block_size=64 does not divide.*96.*\[96, 48"),
        create_session() as session,
    ):
        session.initialize(model, modifier)


def test_random_matrix_cannot_be_online():
    model = _llama()
    modifier = SpinQuantModifier(rotations=["R4"], transform_type="random-matrix")
    with (
        pytest.raises(ValueError, match=r"random-matrix.*cannot be an online rotation"),
        create_session() as session,
    ):
        session.initialize(model, modifier)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"transform_block_size": 0}, "transform_block_size"),
        (
            {
                "transform_config": {
                    "config_groups": {
                        "R4": {
                            "type": "random-matrix",
                            "apply": [{"targets": ["re:.*down_proj$"], "location": "input"}],
                        }
                    }
                }
            },
            r"config_groups.R4.type 'random-matrix': an online rotation must be one of",
        ),
        (
            {
                "transform_config": {
                    "config_groups": {
                        "R4": {
                            "type": "hadamard",
                            "apply": [
                                {"targets": ["re:.*down_proj$"], "location": "input"},
                                {"targets": ["re:.*down_proj$"], "location": "output"},
                            ],
                        }
                    }
                }
            },
            r"location 'output' cannot be part of an online rotation",
        ),
    ],
)
def test_bad_online_arguments_fail_at_parse_time(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        SpinQuantModifier(**kwargs)


def test_a_given_transform_config_with_r4_is_applied():
    config = {
        "config_groups": {
            "R4": {
                "type": "hadamard",
                "precision": "float32",
                "apply": [
                    {"targets": ["re:.*down_proj$"], "location": "input"},
                    {"targets": ["re:.*down_proj$"], "location": "weight_input", "inverse": True},
                ],
            }
        }
    }
    model = _llama(intermediate_size=64)
    with torch.no_grad():
        reference = model(IDS).logits
    _oneshot(model, SpinQuantModifier(transform_config=config))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference, atol=1e-4, rtol=0)
    assert any(isinstance(m, TransformBase) for m in model.modules())


def test_split_and_online_part():
    modifier = SpinQuantModifier(rotations=["R1", "R2", "R4"])
    model = _llama(intermediate_size=64)
    with create_session() as session:
        session.initialize(model, modifier)
        config = modifier._config
    fused, online = split_transform_config(config)
    assert list(fused.config_groups) == ["R1", "R2"] and list(online.config_groups) == ["R4"]
    runtime = online_part(config)
    assert isinstance(runtime, TransformConfig)
    assert [a.location for a in runtime.config_groups["R4"].apply] == ["input"]


def test_recipe_round_trip_keeps_r4_and_the_block_size():
    recipe = Recipe.from_yaml(
        "s_stage:\n  m_modifiers:\n    SpinQuantModifier: {rotations: [r1, r2, r4], transform_block_size: 64}\n"
    )
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    modifier = again.modifiers[0]
    again = modifier
    assert again.rotations == ["R1", "R2", "R4"] and again.transform_block_size == 64

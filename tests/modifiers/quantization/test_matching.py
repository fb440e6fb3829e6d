"""scheme_for_module: the one answer to "which scheme does this module get", and matching."""

from __future__ import annotations

import copy

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from loguru import logger

from compressor.modifiers.quantization.matching import match_quantizable_modules, scheme_for_module
from compressor.modifiers.quantization.scheme import resolve_quantization_config


def _config(groups: dict, ignore=("lm_head",)) -> QuantizationConfig:
    from compressed_tensors.quantization import QuantizationScheme

    schemes = {name: QuantizationScheme(**group) for name, group in groups.items()}
    return resolve_quantization_config(config_groups=schemes, ignore=list(ignore))


def _weights(bits: int) -> dict:
    return {"num_bits": bits, "strategy": "channel", "symmetric": True}


def _bits(scheme) -> int | None:
    return None if scheme is None else scheme.weights.num_bits


# class, two regexes and an exact name, written from the least to the most specific
LAYERED = {
    "by_class": {"targets": ["Linear"], "weights": _weights(8)},
    "mlp": {"targets": ["re:.*mlp\\..*"], "weights": _weights(7)},
    "down": {"targets": ["re:.*down_proj"], "weights": _weights(6)},
    "one_layer": {"targets": ["model.layers.1.mlp.down_proj"], "weights": _weights(5)},
}


def test_the_most_specific_target_decides_exact_name_then_regex_then_class(tiny_llama):
    config = _config(LAYERED)
    modules = dict(tiny_llama.named_modules())

    def bits(name):
        return _bits(scheme_for_module(name, modules[name], config))

    assert bits("model.layers.1.mlp.down_proj") == 5  # exact name over two regexes and a class
    # two regexes match: the alphabetically first pattern decides, as in compressed-tensors
    assert bits("model.layers.0.mlp.down_proj") == 6
    assert bits("model.layers.0.mlp.gate_proj") == 7  # a regex over a class
    assert bits("model.layers.0.self_attn.q_proj") == 8
    assert bits("lm_head") is None  # ignored
    assert bits("model.layers.0.mlp") is None  # "re:.*mlp\..*" needs a dot after mlp


def test_a_target_named_by_two_groups_takes_the_last_group():
    config = _config(
        {
            "first": {"targets": ["Linear"], "weights": _weights(8)},
            "second": {"targets": ["Linear"], "weights": _weights(4)},
        }
    )
    assert _bits(scheme_for_module("fc", torch.nn.Linear(4, 4), config)) == 4


def test_ignore_wins_over_an_exact_name(tiny_llama):
    config = _config(
        {"g": {"targets": ["model.layers.0.mlp.up_proj"], "weights": _weights(8)}},
        ignore=["re:.*up_proj"],
    )
    module = tiny_llama.model.layers[0].mlp.up_proj
    assert scheme_for_module("model.layers.0.mlp.up_proj", module, config) is None


def test_the_answer_equals_what_compressed_tensors_attaches(tiny_llama):
    config = _config(LAYERED)
    attached = copy.deepcopy(tiny_llama)
    apply_quantization_config(attached, config, show_progress=False)
    for name, module in attached.named_modules():
        if isinstance(module, torch.nn.Linear):
            expected = getattr(module, "quantization_scheme", None)
            assert scheme_for_module(name, module, config) == expected, name


def test_fit_checks_use_the_deciding_scheme():
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    # down_proj's input width is 48: group 32 fits every other Linear, not down_proj, which a
    # more specific target quantizes per channel
    model = LlamaForCausalLM(tiny_llama_config(intermediate_size=48))
    weights_g32 = {"num_bits": 8, "strategy": "group", "group_size": 32}
    config = _config(
        {
            "linear": {"targets": ["Linear"], "weights": weights_g32},
            "down": {"targets": ["re:.*down_proj"], "weights": _weights(4)},
        }
    )
    matched = match_quantizable_modules(model, config)
    assert len(matched) == 2 * 7
    only_linear = _config({"linear": {"targets": ["Linear"], "weights": weights_g32}})
    with pytest.raises(ValueError, match=r"group_size=32 does not divide .*down_proj"):
        match_quantizable_modules(model, only_linear)


@pytest.fixture
def warnings():
    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(str(m)), level="WARNING", format="{message}")
    yield messages
    logger.remove(handle)


def test_a_target_that_decides_a_module_is_not_reported_unmatched(tiny_llama, warnings):
    config = _config(
        {
            "linear": {"targets": ["Linear"], "weights": _weights(8)},
            "down": {"targets": ["re:.*down_proj"], "weights": _weights(4)},
        }
    )
    match_quantizable_modules(tiny_llama, config)
    assert warnings == []


def test_a_target_every_match_of_which_a_more_specific_one_takes_is_named(tiny_llama, warnings):
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    config = _config(
        {
            "down": {"targets": ["re:.*down_proj"], "weights": _weights(4)},
            "by_name": {"targets": names, "weights": _weights(8)},
        }
    )
    assert sorted(match_quantizable_modules(tiny_llama, config)) == names
    assert len(warnings) == 1
    assert "'re:.*down_proj' decides no module's scheme" in warnings[0]
    assert names[0] in warnings[0]

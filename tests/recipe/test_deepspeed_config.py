import json
from pathlib import Path

import pytest

from compressor import RecipeError
from compressor.recipe.deepspeed.config import load_deepspeed_config

DATA = Path(__file__).parent / "data"


def test_tutorial_quantization_config_parses_with_resolved_values():
    config = load_deepspeed_config(DATA / "ds_bert_quantization.json")
    assert config.enabled() == ["weight_quantization", "activation_quantization"]
    wq = config.techniques["weight_quantization"]
    assert wq.shared.quantization_type == "symmetric" and wq.shared.schedule_offset == 2
    params, group = wq.groups["wq1"]
    assert (params.start_bits, params.target_bits, params.quantization_period) == (8, 4, 2)
    assert group.modules == ["attention.self", "intermediate", "output.dense"]
    aq = config.techniques["activation_quantization"].shared
    assert (aq.range_calibration, aq.schedule_offset, aq.quantization_type) == (
        "static",
        2,
        "asymmetric",
    )


def test_code_defaults_win_where_the_docs_differ():
    config = load_deepspeed_config(
        {
            "activation_quantization": {
                "shared_parameters": {"enabled": True},
                "different_groups": {"a": {"params": {"bits": 8}}},
            },
            "sparse_pruning": {
                "shared_parameters": {"enabled": True},
                "different_groups": {"s": {"params": {"dense_ratio": 0.3}}},
            },
            "head_pruning": {
                "shared_parameters": {"enabled": True, "num_heads": 2},
                "different_groups": {"h": {"params": {"dense_ratio": 0.5}}},
            },
        }
    )
    aq = config.techniques["activation_quantization"].shared
    assert aq.schedule_offset == 1000 and aq.range_calibration == "dynamic"
    assert config.techniques["sparse_pruning"].shared.schedule_offset == 1000
    assert config.techniques["head_pruning"].shared.method == "topk"
    _, group = config.techniques["sparse_pruning"].groups["s"]
    assert group.modules == ["*"] and group.related_modules is None


def test_pruning_and_layer_reduction_configs_parse():
    pruning = load_deepspeed_config(json.loads((DATA / "ds_bert_pruning.json").read_text()))
    assert pruning.enabled() == ["sparse_pruning", "row_pruning", "head_pruning"]
    assert pruning.techniques["sparse_pruning"].shared.schedule_offset_end == 6
    _, head = pruning.techniques["head_pruning"].groups["rp1"]
    assert head.related_modules == [["self.query", "self.key", "self.value"]]
    reduction = load_deepspeed_config(DATA / "ds_bert_layer_reduction.json").layer_reduction
    assert reduction.enabled and reduction.teacher_layer == [1, 3]


def _wq(shared=None, params=None):
    return {
        "weight_quantization": {
            "shared_parameters": {"enabled": True, **(shared or {})},
            "different_groups": {"wq1": {"params": params or {"start_bits": 8, "target_bits": 8}}},
        }
    }


@pytest.mark.parametrize(
    "config, message",
    [
        (
            _wq(params={"target_bits": 8}),
            "weight_quantization -> different_groups -> wq1 -> params -> start_bits: required",
        ),
        (_wq(params={"start_bits": 4, "target_bits": 8}), "must not exceed start_bits"),
        (
            _wq(shared={"quantization_type": "sym"}),
            "shared_parameters -> quantization_type: got 'sym'",
        ),
        (_wq(shared={"rounding": "up"}), "rounding: got 'up'"),
        (_wq(shared={"quantize_bits": 8}), "quantize_bits: DeepSpeed does not read this key"),
        (
            {
                "activation_quantization": {
                    "shared_parameters": {"enabled": True},
                    "different_groups": {"a": {"params": {"bits": 6}}},
                }
            },
            "activation_quantization -> different_groups -> a -> params -> bits: got 6",
        ),
        (
            {
                "activation_quantization": {
                    "shared_parameters": {"enabled": True, "range_calibration": "minmax"}
                }
            },
            "range_calibration: got 'minmax'",
        ),
        (
            {
                "row_pruning": {
                    "shared_parameters": {"enabled": True, "method": "l2"},
                    "different_groups": {"r": {"params": {"dense_ratio": 0.5}}},
                }
            },
            "row_pruning -> shared_parameters -> method: got 'l2'",
        ),
        (
            {
                "head_pruning": {
                    "shared_parameters": {"enabled": True},
                    "different_groups": {"h": {"params": {"dense_ratio": 0.5}}},
                }
            },
            "num_heads must be given",
        ),
        (
            {
                "sparse_pruning": {
                    "shared_parameters": {"enabled": True},
                    "different_groups": {"s": {"params": {}}},
                }
            },
            "sparse_pruning -> different_groups -> s -> params -> dense_ratio: required",
        ),
        (
            {"sparse_pruning": {"shared_parameters": {"enabled": True}}},
            "different_groups must be given",
        ),
        ({"weight_quantisation": {}}, "unknown technique"),
        (
            {"layer_reduction": {"enabled": True, "keep_number_layer": 3, "teacher_layer": [1, 2]}},
            "keep_number_layer \\(3\\) differs",
        ),
    ],
)
def test_errors_name_the_technique_group_and_key(config, message):
    with pytest.raises(RecipeError, match=message):
        load_deepspeed_config({"compression_training": config})

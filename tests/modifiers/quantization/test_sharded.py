"""How far a weight scale reaches, which decides what tensor parallelism must reduce
(``modifiers/quantization/sharded.py``); the split weights themselves are tested on two
processes in tests/entrypoints/test_tensor_parallel.py."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs

from compressor.modifiers.quantization.sharded import (
    activation_reduction,
    scale_extent,
    shard_reduction,
)
from compressor.utils.sharding import full_tensor, layout_of, local_part, local_view


def _args(strategy, **extra):
    return QuantizationArgs(num_bits=4, strategy=strategy, **extra)


@pytest.mark.parametrize(
    ("args", "levels", "extent"),
    [
        (_args("tensor"), None, (None, None)),
        (_args("channel"), None, (1, None)),
        (_args("group", group_size=16), None, (1, 16)),
        (_args("block", block_structure=[8, 16]), None, (8, 16)),
        (_args("channel"), "ternary", (1, None)),
        (_args("tensor"), "binary", (None, None)),
    ],
)
def test_each_strategy_reaches_its_rows_and_columns(args, levels, extent):
    assert scale_extent(args, "q_proj", levels) == extent


def test_a_strategy_without_a_split_layout_is_refused_by_module():
    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16)
    with pytest.raises(ValueError, match="q_proj: weight strategy 'tensor_group' is not supported"):
        scale_extent(args, "q_proj")


def test_ordinary_tensors_need_no_reduction_and_pass_through():
    weight = torch.randn(8, 32)
    assert layout_of(weight) is None
    assert shard_reduction(_args("tensor"), weight, "q_proj", "ternary") is None
    token = QuantizationArgs(num_bits=8, strategy="token", dynamic=True)
    assert activation_reduction(token, weight, "q_proj", fused=False) is None
    assert local_view(weight) is weight and local_part(weight, weight) is weight
    assert torch.equal(full_tensor(weight), weight)

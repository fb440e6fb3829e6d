"""What GPTQ and SparseGPT need from ``SharedHessians`` to reduce them over ranks: the sets
within a list of Linears, split off from Linears outside it, and replaced whole. (The
reduction itself, on two processes: tests/entrypoints/test_oneshot_ranks.py.)"""

import pytest
import torch

from compressor.modifiers.quantization.gptq.hessian import SharedHessians
from compressor.modifiers.quantization.gptq.ranks import reduce_hessians


def _hessians() -> tuple[SharedHessians, torch.Tensor]:
    hessians = SharedHessians()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    for name in ("q", "k", "v"):
        hessians.observe(name, x)
    hessians.observe("o", 2 * x)
    return hessians, x


def test_sets_within_split_off_the_linears_outside_the_list():
    hessians, _ = _hessians()
    assert hessians.sets_within(["o", "k", "q"]) == [["o"], ["k", "q"]]
    # v kept its own copy of the Hessian it shared with q and k
    assert not hessians.same_set("q", "v") and hessians.same_set("q", "k")
    torch.testing.assert_close(hessians["v"][0], hessians["q"][0])
    assert hessians["v"][0] is not hessians["q"][0]


def test_a_replaced_set_holds_the_new_hessian_and_count():
    hessians, _ = _hessians()
    hessians.sets_within(["q", "k"])
    total = torch.eye(4)
    hessians.replace(["q", "k"], total, 42)
    assert hessians["q"] == (total, 42) and hessians.same_set("q", "k")
    hessians.replace(["new"], torch.eye(4), 3)  # a Linear without a Hessian takes one
    assert hessians["new"][1] == 3
    with pytest.raises(ValueError, match="not one whole set"):
        hessians.replace(["q"], total, 1)  # k still shares q's set
    with pytest.raises(ValueError, match="not one whole set"):
        hessians.replace(["q", "k", "o"], total, 1)


def test_in_one_process_the_reduction_only_keeps_the_linears_with_a_hessian():
    hessians, x = _hessians()
    before = hessians["q"][0].clone()
    names = reduce_hessians(hessians, ["q", "unseen", "o"], {})
    assert names == ["q", "o"]
    assert torch.equal(hessians["q"][0], before) and hessians["q"][1] == 5

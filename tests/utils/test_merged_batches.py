"""utils.merged_batches: a stacked forward's calibration batches, seen one by one again."""

import pytest
import torch

from compressor.utils.merged_batches import merged_batches, split_into_batches


def test_split_follows_the_stacked_batch_sizes_and_ends_with_the_block():
    value = torch.arange(5 * 3 * 2.0).reshape(5, 3, 2)
    assert len(split_into_batches(value, "here")) == 1  # nothing stacked
    with merged_batches((2, 1, 2)):
        parts = split_into_batches(value, "here")
        assert [p.shape[0] for p in parts] == [2, 1, 2]
        assert torch.equal(torch.cat(parts), value)
        with merged_batches((5,)):  # a call on its own inside: nothing to split
            assert len(split_into_batches(value, "here")) == 1
    assert len(split_into_batches(value, "here")) == 1


def test_tokens_gathered_across_rows_cannot_be_split():
    """An expert's routed tokens (rows mixed, first dimension not the rows): an error naming
    the module, not a wrong statistic."""
    with merged_batches((2, 2)), pytest.raises(RuntimeError, match="experts.0.*does not keep"):
        split_into_batches(torch.zeros(7, 4), "experts.0 (input activations)")

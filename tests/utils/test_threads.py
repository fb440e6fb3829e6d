"""one_cpu_thread: one torch thread inside, the caller's count after, also on error."""

import pytest
import torch

from compressor.utils.threads import one_cpu_thread


def test_one_thread_inside_and_the_count_restored_after_an_error():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="inside"), one_cpu_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        with one_cpu_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)

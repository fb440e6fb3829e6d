"""CPU thread counts for steps made of many small tensor operations.

torch runs each operation's parallel region over its OpenMP threads (by default one per
core). For a step that is thousands of small operations, such as sampling text token by
token, every region ends at a barrier that waits for its slowest thread; when another process
shares the cores, that thread is often descheduled, and the step slows by an order of
magnitude while its spinning threads burn CPU. On one thread nothing waits: slightly slower
on idle cores, and only as slow as its share of the CPU on busy ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["one_cpu_thread"]


@contextlib.contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run the block with torch on one CPU thread; the previous count is restored after,
    also on error. A no-op when torch already runs on one thread."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

"""Returning freed memory to the operating system between the steps of long runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any

__all__ = ["release_free_memory"]


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl)
    except OSError:
        return None


def release_free_memory() -> None:
    """Give the heap memory that is free back to the operating system (glibc's
    ``malloc_trim``); a no-op elsewhere.

    Layer-by-layer compression allocates and frees the same large temporaries (activations,
    Hessians, weight copies) once per layer. glibc keeps freed blocks of up to 32 MB in the
    process heap, where fragmentation can make resident memory creep up from layer to layer;
    trimming between the steps keeps the peak at what one layer needs (measured on a
    4-layer, 49M-parameter Llama with GPTQ: 1065 MB without, 990 MB with, same time).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)

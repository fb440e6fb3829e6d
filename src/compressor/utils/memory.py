"""Memory on Linux hosts: freed memory given back between the steps of long runs, and weights
written over in place without paying for copy-on-write."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
import os
import platform
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from loguru import logger

__all__ = [
    "freed_memory_returned",
    "resident_bytes",
    "resident_headroom",
    "keep_freed_tensors_in_heap",
    "overwrite_",
    "overwrite_all_",
    "release_free_memory",
]

_MAP_FIXED = 0x10  # the same on x86-64 and arm64 Linux (absent from Python's mmap module)
_REMAP_MIN_PAGES = 16
"""Smaller targets are copied plainly: a handful of faults is cheaper than reading the maps."""


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl)
    except OSError:
        return None


@functools.cache
def _mmap() -> Any:
    """libc's ``mmap`` where replacing pages in place is known to work: Linux on x86-64 or
    arm64 with glibc; else None."""
    libc = _libc()
    if libc is None or platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        return None
    function = libc.mmap
    function.restype = ctypes.c_void_p
    function.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    return function


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its adaptive threshold
_TRIM_THRESHOLD = 2 * _MMAP_THRESHOLD  # the ratio glibc's adaptive rule keeps
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


@functools.cache
def keep_freed_tensors_in_heap() -> bool:
    """Let glibc's malloc keep freed blocks of up to 32 MB for reuse (once per process).

    A forward pass allocates and frees megabyte-sized activations hundreds of times. With
    glibc's adaptive defaults, the heap's free top is often given back to the system on a
    free and taken again on the next allocation, each page then faulting in anew. Fixed
    thresholds (blocks up to 32 MB from the heap, its top trimmed past 64 MB) keep those
    pages (measurements: bench/results/2026-12-01-notes-gptq-memory.md). Memory that is free
    for longer is still returned between the steps of long runs (``release_free_memory``).

    Nothing is changed when the user tuned malloc already (``MALLOC_*_`` variables or a
    ``glibc.malloc`` tunable), or outside glibc.

    :return: whether the thresholds were set
    """
    libc = _libc()
    if libc is None or _user_tuned_malloc():
        return False
    done = _set_thresholds(libc, _MMAP_THRESHOLD, _TRIM_THRESHOLD)
    logger.debug("malloc keeps freed blocks up to {} MB: {}", _MMAP_THRESHOLD >> 20, done)
    return done


def _user_tuned_malloc() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return "glibc.malloc" in tunables or any(v in os.environ for v in _USER_SETTINGS)


def _set_thresholds(libc: Any, mmap_threshold: int, trim_threshold: int) -> bool:
    done = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and done


_RETURNED_FROM = 128 << 10
"""glibc's default threshold: blocks from this size up are mapped on their own."""


@contextlib.contextmanager
def freed_memory_returned() -> Iterator[None]:
    """Within the block, blocks of 128 KB and more are mapped on their own and given back to
    the system when freed; after it, the process's thresholds are back (freed blocks up to
    32 MB kept in the heap if ``keep_freed_tensors_in_heap`` set them, else glibc's initial
    ones) and what is free is trimmed.

    For a pass that brings each weight in once and frees it (compressed-tensors compressing a
    model whose layers are on disk, as a save does): kept in the heap, those freed blocks
    stay resident, fragmented, until the pass ends, and resident memory grows with the model
    instead of one weight's worth (measurements: bench/results/2026-12-02-scale.md).
    Nothing is changed when the user tuned malloc (``MALLOC_*_`` variables or a
    ``glibc.malloc`` tunable), or outside glibc.
    """
    libc = _libc()
    if libc is None or _user_tuned_malloc():
        yield
        return
    kept = keep_freed_tensors_in_heap.cache_info().currsize > 0  # set for this process
    _set_thresholds(libc, _RETURNED_FROM, _RETURNED_FROM)
    try:
        yield
    finally:
        if kept:
            _set_thresholds(libc, _MMAP_THRESHOLD, _TRIM_THRESHOLD)
        # else glibc's initial thresholds stay (only its adaptive rule is off once set)
        libc.malloc_trim(0)


def _status_kib() -> dict[str, int]:
    """The ``Vm*`` fields of ``/proc/self/status``, in KiB; empty where that is not available."""
    try:
        with open("/proc/self/status") as status:
            return {
                name: int(value.split()[0])
                for name, value in (line.split(":", 1) for line in status if line.startswith("Vm"))
            }
    except (OSError, ValueError, IndexError):
        return {}


def resident_bytes() -> int:
    """Bytes the process holds now (``VmRSS`` of ``/proc/self/status``); 0 where that is
    not available."""
    return _status_kib().get("VmRSS", 0) * 1024


def resident_headroom() -> int:
    """Bytes the process could hold now without raising its peak resident memory: its peak
    so far (``VmHWM``) minus what it holds (``VmRSS``), read from ``/proc/self/status``;
    0 where that is not available."""
    fields = _status_kib()
    if "VmHWM" not in fields or "VmRSS" not in fields:
        return 0
    return max(0, fields["VmHWM"] - fields["VmRSS"]) * 1024


def release_free_memory() -> None:
    """Give the heap memory that is free back to the operating system (glibc's
    ``malloc_trim``); a no-op elsewhere.

    Layer-by-layer compression allocates and frees the same large temporaries (activations,
    Hessians, weight copies) once per layer. glibc keeps freed blocks of up to 32 MB in the
    process heap, where fragmentation can make resident memory creep up from layer to layer;
    trimming once per layer keeps the peak at what one layer needs, at no cost in time
    (measurements: bench/results/2026-12-01-notes-gptq-memory.md).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) .w.p \S+ \S+ ([1-9]\d*)", re.MULTILINE)
"""A writable private mapping of a file (non-zero inode) in ``/proc/self/maps``."""


def _private_file_mappings() -> list[tuple[int, int]]:
    """Every writable private mapping of a file, as ``(start, end)`` addresses."""
    with open("/proc/self/maps") as maps:
        text = maps.read()
    return [(int(m[1], 16), int(m[2], 16)) for m in _MAPPING.finditer(text)]


def _intersect(mappings: list[tuple[int, int]], low: int, high: int) -> list[tuple[int, int]]:
    """The parts of ``[low, high)`` inside ``mappings``."""
    return [(max(a, low), min(b, high)) for a, b in mappings if max(a, low) < min(b, high)]


def _storage_span(tensor: torch.Tensor) -> tuple[int, int]:
    """The addresses of all of ``tensor``'s storage, ``[start, end)``."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def overwrite_(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``target.copy_(source)``, without copy-on-write when ``target`` is a memory-mapped file.

    A model loaded from safetensors on CPU keeps its weights in a private mapping of the
    checkpoint file. Writing a new weight there makes the kernel copy every page from the file
    before it is overwritten, several times the cost of a fresh page (measurements:
    bench/results/2026-12-01-notes-gptq-memory.md). Since every byte is overwritten,
    the whole pages inside ``target`` are first replaced by fresh anonymous pages at the same
    addresses (``mmap`` with ``MAP_FIXED``), then written. Addresses, views and aliases are
    unchanged, the file is not touched (as with a copy into a private mapping), and resident
    memory is the same: the file's pages leave as the new ones arrive.

    Anything else (a shared mapping, heap memory, a small, non-contiguous or non-CPU target, a
    source overlapping the target, another platform) is a plain ``copy_``.

    :return: ``target``
    """
    overwrite_all_([(target, source)])
    return target


def overwrite_all_(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``overwrite_`` for each ``(target, source)``, reading the process's mappings once."""
    remap = _mmap()
    page = mmap.PAGESIZE
    read = [_storage_span(s) for _, s in pairs if s.device.type == "cpu"]
    fresh: list[tuple[int, int]] = []
    for target, _ in pairs:
        if remap is None:
            break
        size = target.numel() * target.element_size()
        if target.device.type != "cpu" or not target.is_contiguous():
            continue
        if size < _REMAP_MIN_PAGES * page:
            continue
        address = target.data_ptr()
        if any(start < address + size and address < end for start, end in read):
            continue  # a source reads these pages
        # whole pages only: the edge pages may hold neighbours
        fresh.append((-(-address // page) * page, (address + size) // page * page))
    if fresh:
        mappings = _private_file_mappings()
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
        protection = mmap.PROT_READ | mmap.PROT_WRITE
        for low, high in fresh:
            for first, last in _intersect(mappings, low, high):
                if remap(first, last - first, protection, flags, -1, 0) != first:
                    # the old pages are still there (the call failed as a whole)
                    logger.debug("fresh pages refused (errno {})", ctypes.get_errno())
    with torch.no_grad():
        for target, source in pairs:
            target.copy_(source)

"""Models whose weights live off the compute device: offloaded to CPU memory or to disk.

A model too large for memory is loaded offloaded, with accelerate
(``from_pretrained(path, device_map=..., offload_folder=...)``) or with compressed-tensors'
offloading. Its offloaded modules hold their weights elsewhere and bring them in ("onload")
for each forward; a plain ``weight.data.copy_`` then writes into a temporary copy and is lost.

compressed-tensors' offloading is the one its quantization lifecycle understands, so an
accelerate-offloaded model is converted to it first (``prepare_offloaded_model``). From then
on weights are written with ``update_offload_parameter`` (which also handles modules that are
not offloaded), and the sequential pipeline keeps one decoder layer's weights onloaded for its
turn (``layer_onloaded``), so that only one layer sits in memory at a time.

Under a process group every rank holds a whole model of its own and writes its compressed
weights into it, so each rank keeps its own offload (``_own_offload_per_rank``): compressed-
tensors would otherwise share rank 0's (its disk files or shared memory) with every rank, and
the ranks would rewrite the same files at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from compressed_tensors.offload import disable_offloading, from_accelerate
from compressed_tensors.offload.cache import (
    CPUCache,
    DeviceCache,
    DiskCache,
    DistributedCPUCache,
    DistributedDeviceCache,
    DistributedDiskCache,
    OffloadCache,
)
from compressed_tensors.offload.utils import as_single_threaded
from loguru import logger

from compressor.utils import distributed

__all__ = [
    "check_device_unset",
    "check_offload_support",
    "is_dispatched",
    "is_offloaded",
    "layer_onloaded",
    "prepare_offloaded_model",
]


def _accelerate_offloads(module: torch.nn.Module) -> bool:
    """Whether accelerate's hooks on ``module`` keep its weights off the execution device."""
    hook: Any = getattr(module, "_hf_hook", None)
    if hook is None:
        return False
    hooks = getattr(hook, "hooks", None) or [hook]  # a SequentialHook holds several
    return any(getattr(h, "offload", False) for h in hooks)


def _offloads(module: torch.nn.Module) -> bool:
    """Whether ``module``'s weights live elsewhere than where it computes (so that reading a
    weight gives a temporary copy)."""
    cache = module._parameters
    if isinstance(cache, OffloadCache):
        return str(cache.offload_device) != str(cache.onload_device)
    return _accelerate_offloads(module)


def is_dispatched(model: torch.nn.Module) -> bool:
    """Whether compressed-tensors' dispatch places ``model``'s modules (offloaded or not)."""
    return any(isinstance(m._parameters, OffloadCache) for m in model.modules())


def is_offloaded(model: torch.nn.Module) -> bool:
    """Whether any module of ``model`` keeps its weights off its compute device."""
    return any(_offloads(m) for m in model.modules())


def prepare_offloaded_model(model: torch.nn.Module) -> bool:
    """Convert accelerate's dispatch (device map, offloading) to compressed-tensors' own, in
    place, if the model has accelerate hooks: its quantization cannot wrap a forward that
    accelerate already wrapped.

    Under a process group, every rank (all of them call this) converts its own model for
    itself: its offloaded weights stay in its own files or memory, as in one process, rather
    than shared from rank 0 (see the module docstring).

    :return: whether the model is offloaded (``is_offloaded``)
    :raises ValueError: accelerate hooks that cannot be converted (for example
        ``accelerate.cpu_offload``, which keeps no record of where each weight lives); under a
        process group, offloaded weights shared across the ranks, or two ranks of one machine
        offloading to one folder
    """
    per_rank = distributed.is_distributed()
    if per_rank:
        _check_offload_per_rank(model)
    if any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):
        try:
            if per_rank:
                # compressed-tensors converts for this rank alone, then keeps it so
                with as_single_threaded():
                    from_accelerate(model)
                _own_offload_per_rank(model)
            else:
                from_accelerate(model)
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                "the model is dispatched with accelerate hooks that cannot be converted to "
                f"compressed-tensors' dispatch ({err}). Load it with "
                "from_pretrained(path, device_map=..., offload_folder=...) or without hooks"
            ) from err
        logger.info("model dispatched by accelerate: converted to compressed-tensors' dispatch")
    return is_offloaded(model)


_SHARED_CACHES: dict[type[OffloadCache], type[OffloadCache]] = {
    DistributedDiskCache: DiskCache,
    DistributedCPUCache: CPUCache,
    DistributedDeviceCache: DeviceCache,
}


def _own_offload_per_rank(model: torch.nn.Module) -> None:
    """Give every module of ``model`` the single-process cache of its kind, holding the same
    tensors. compressed-tensors picks a distributed cache whenever a process group exists; it
    offloads each new tensor (a quantization scale) on rank 0 and points the other ranks at
    rank 0's file or shared memory, where every rank would then write its own updates."""
    for module in model.modules():
        for attribute in ("_parameters", "_buffers"):
            cache = getattr(module, attribute)
            single = _SHARED_CACHES.get(type(cache))
            if single is None:
                continue
            extra = {"offload_dir": cache.offload_dir} if isinstance(cache, DiskCache) else {}
            own = single(cache.onload_device, offload_device=cache.offload_device, **extra)
            own.offloaded_values = cache.offloaded_values
            setattr(module, attribute, own)


def _check_offload_per_rank(model: torch.nn.Module) -> None:
    """Under a process group, refuse on every rank (a collective: every rank calls it) what
    would make ranks write the same offloaded weights: a model whose offload compressed-
    tensors shares across the ranks (``load_offloaded_model``, or its dispatch under a process
    group: the ranks read rank 0's files or memory), or two ranks of one machine whose models
    accelerate offloaded to one folder (converting them rewrites and removes accelerate's
    files there, the weights it stored as ``.dat``)."""
    shared = next(
        (
            name or "the model"
            for name, module in model.named_modules()
            if isinstance(module._parameters, DistributedDiskCache | DistributedCPUCache)
        ),
        None,
    )
    folder = _accelerate_disk_folder(model)
    place = None if folder is None else (socket.gethostname(), os.path.realpath(folder))
    facts = distributed.all_gather_object((shared, place))
    for rank, (module, _) in enumerate(facts):
        if module is not None:
            raise ValueError(
                f"model: on rank {rank}, {module} is offloaded by compressed-tensors across "
                "the ranks (every rank reads rank 0's copy), but under a process group each "
                "rank writes its compressed weights into its own model. Load each rank's model "
                "with from_pretrained(path, device_map=..., offload_folder=<a folder per "
                "rank>), or pass the checkpoint directory and offload_folder to oneshot"
            )
    places = [p for _, p in facts]
    if place is not None and places.count(place) > 1:
        ranks = [r for r, p in enumerate(places) if p == place]
        raise ValueError(
            f"offload_folder={folder!r}: ranks {ranks} offloaded their models to the same "
            "folder; under a process group each rank rewrites its own offloaded weights, so "
            "give each rank its own offload_folder (oneshot with offload_folder does: "
            "offload_folder/rank<N>)"
        )


def _accelerate_disk_folder(model: torch.nn.Module) -> str | None:
    """The folder accelerate offloaded ``model``'s weights to disk in, if it did."""
    for module in model.modules():
        hook: Any = getattr(module, "_hf_hook", None)
        for h in (getattr(hook, "hooks", None) or [hook]) if hook is not None else []:
            weights = getattr(h, "weights_map", None) if getattr(h, "offload", False) else None
            while weights is not None and hasattr(weights, "dataset"):  # a PrefixedDataset
                weights = weights.dataset
            folder = getattr(weights, "save_folder", None)
            if folder is not None:
                return str(folder)
    return None


def check_offload_support(modifiers: Iterable[Any]) -> None:
    """Refuse an offloaded model for modifiers that would write into temporary copies.

    :raises ValueError: naming the modifiers that do not support offloaded models
    """
    unsupported = sorted(
        {
            type(m).__name__
            for m in modifiers
            if not m.calibration_traits().supports_offloaded_models
        }
    )
    if unsupported:
        raise ValueError(
            f"the model is offloaded (its weights live on CPU or disk and are brought in for "
            f"each forward), which {', '.join(unsupported)} do(es) not support yet: their "
            "weight updates would be lost. Supported with offloading: GPTQModifier, SparseGPTModifier, WandaPruningModifier, "
            "QuantizationModifier. Load the model without offloading to use the others"
        )


def check_device_unset(model: torch.nn.Module, device: Any) -> None:
    """Refuse a compute ``device`` for a dispatched or offloaded model: each of its modules
    computes where its dispatch put it (its onload device).

    :raises ValueError: naming the device
    """
    if device is None or not is_dispatched(model):
        return
    what = "an offloaded model" if is_offloaded(model) else "a model dispatched over devices"
    raise ValueError(
        f"device={str(device)!r} with {what} (device_map): each module computes on its own "
        "onload device, set when the model was loaded; leave device unset"
    )


@contextlib.contextmanager
def layer_onloaded(offloaded: bool) -> Iterator[None]:
    """Keep every weight onloaded once read, until the block ends (one layer's turn).

    Without it each forward of each calibration batch would bring the layer's weights in
    again (from disk, for disk offloading). Writes through ``update_offload_parameter``
    update the kept copy too. A no-op for models that are not offloaded.
    """
    if not offloaded:
        yield
        return
    with disable_offloading():
        yield

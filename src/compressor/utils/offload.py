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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from compressed_tensors.offload import disable_offloading, from_accelerate
from compressed_tensors.offload.cache import OffloadCache
from loguru import logger

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

    :return: whether the model is offloaded (``is_offloaded``)
    :raises ValueError: accelerate hooks that cannot be converted (for example
        ``accelerate.cpu_offload``, which keeps no record of where each weight lives)
    """
    if any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):
        try:
            from_accelerate(model)
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                "the model is dispatched with accelerate hooks that cannot be converted to "
                f"compressed-tensors' dispatch ({err}). Load it with "
                "from_pretrained(path, device_map=..., offload_folder=...) or without hooks"
            ) from err
        logger.info("model dispatched by accelerate: converted to compressed-tensors' dispatch")
    return is_offloaded(model)


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

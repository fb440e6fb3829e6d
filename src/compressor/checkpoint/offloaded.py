"""Writing a model whose weights live on disk one shard at a time, not all at once.

transformers' ``save_pretrained`` starts from ``model.state_dict()``. Under compressed-tensors'
offloading that reads every offloaded weight into memory at once (each module's parameter
cache onloads on access), so saving a model loaded with its layers on disk would hold the
whole model, compressed, in memory; and its default shard size (50 GB) would put every
tensor in one file written in one go. Handed accelerate's offloading instead
(``compressed_tensors.offload.to_accelerate``: offloaded weights stay on the meta device,
each read from disk by its hook's weights map), transformers reads each shard's tensors
just before writing that shard. With shards no larger than the largest decoder layer as
stored, the memory a save needs is one layer's, whatever the model's size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from compressed_tensors.offload import disable_onloading, from_accelerate, to_accelerate
from compressed_tensors.offload.cache import DiskCache
from loguru import logger

from compressor.architectures.layers import find_decoder_layers

__all__ = ["largest_stored_layer_bytes", "written_shard_by_shard"]


def _stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s tensors as stored, read from their offloaded placeholders (shape
    and dtype only: nothing is read from disk)."""
    with disable_onloading():
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def largest_stored_layer_bytes(model: torch.nn.Module) -> int:
    """The bytes of the largest decoder layer as stored (compressed, once compressed), or of
    the largest module holding weights on disk when the decoder layers are not found."""
    try:
        _, layers = find_decoder_layers(model)
        units: list[torch.nn.Module] = list(layers)
    except ValueError:
        units = [m for m in model.modules() if isinstance(m._parameters, DiskCache)]
    return max((_stored_bytes(unit) for unit in units), default=0)


def _on_disk(model: torch.nn.Module) -> bool:
    return any(isinstance(m._parameters, DiskCache) for m in model.modules())


@contextlib.contextmanager
def written_shard_by_shard(
    model: torch.nn.Module, save_kwargs: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """While ``save_pretrained`` runs in the block: a model with weights on disk is handed
    over with accelerate's offloading, and the save's keyword arguments get a
    ``max_shard_size`` of the largest decoder layer as stored (unless given), so that one
    shard's tensors at a time are read into memory. Afterwards the model is back on
    compressed-tensors' offloading. A model without weights on disk is left as it is.

    :param model: the model about to be saved
    :param save_kwargs: the keyword arguments for ``save_pretrained``
    :return: (as the block's value) the keyword arguments to save with
    """
    if not _on_disk(model):
        yield save_kwargs
        return
    kwargs = dict(save_kwargs)
    if "max_shard_size" not in kwargs:
        kwargs["max_shard_size"] = max(largest_stored_layer_bytes(model), 1)
        logger.info(
            "weights on disk: written in shards of at most {:.1f} MB (the largest decoder "
            "layer), each read from disk just before it is written",
            kwargs["max_shard_size"] / 2**20,
        )
    to_accelerate(model)
    try:
        yield kwargs
    finally:
        from_accelerate(model)

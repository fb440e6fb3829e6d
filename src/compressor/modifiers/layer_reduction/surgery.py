"""Pure functions that remove decoder layers from a model and keep its config in step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from compressor.architectures import find_decoder_layers_path

__all__ = ["angular_distance", "keep_decoder_layers"]

# config entries that hold one value per layer
_PER_LAYER_CONFIG = ("layer_types",)


def keep_decoder_layers(
    model: torch.nn.Module, keep: Sequence[int], layers_path: str | None = None
) -> str:
    """Keep only the decoder layers at ``keep`` (in that order), in place.

    The ModuleList is replaced, each kept layer's ``layer_idx`` (used by the KV cache) is
    renumbered, and the config follows (``num_hidden_layers`` and per-layer lists such as
    ``layer_types``), so the model saves and reloads with ``from_pretrained``.

    :param keep: indices of the layers to keep, strictly increasing
    :param layers_path: dotted name of the ModuleList; inferred from the architecture if None
    :return: the dotted name of the ModuleList
    """
    path = layers_path or find_decoder_layers_path(model)
    layers = model.get_submodule(path)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{path} is a {type(layers).__name__}, not a ModuleList of layers")
    count = len(layers)
    keep = list(keep)
    if not keep:
        raise ValueError("at least one layer must be kept")
    if any(not 0 <= i < count for i in keep):
        raise ValueError(f"layer indices {keep} out of range: the model has layers 0..{count - 1}")
    if sorted(set(keep)) != keep:
        raise ValueError(f"layer indices must be strictly increasing without repeats, got {keep}")
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    setattr(parent, attr, kept)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = getattr(model, "config", None)
    if config is not None:
        for name in _PER_LAYER_CONFIG:
            values = getattr(config, name, None)
            if isinstance(values, list) and len(values) == count:
                setattr(config, name, [values[i] for i in keep])
        config.num_hidden_layers = len(keep)
    return path


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean angular distance, arccos(cosine similarity) / pi in [0, 1], between the rows
    (tokens) of two hidden-state tensors of the same shape."""
    a = a.reshape(-1, a.shape[-1]).double()
    b = b.reshape(-1, b.shape[-1]).double()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
    return (torch.arccos(cosine) / torch.pi).mean()

"""Where the decoder layers of a transformers model live, by architecture."""

from __future__ import annotations

import torch

__all__ = ["DECODER_LAYER_PATHS", "find_decoder_layers", "find_decoder_layers_path"]

# model_type -> dotted path of the ModuleList holding the repeated blocks
DECODER_LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
    "bert": "bert.encoder.layer",
}
# where the list sits when the bare base model (no task head) is given
_BASE_MODEL_PATHS = ("layers", "decoder.layers", "h", "encoder.layer")


def find_decoder_layers_path(model: torch.nn.Module) -> str:
    """The dotted name of the ModuleList of decoder (or encoder) blocks.

    :raises ValueError: naming the model type and the architectures that are known
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    candidates = []
    if model_type in DECODER_LAYER_PATHS:
        candidates.append(DECODER_LAYER_PATHS[model_type])
    candidates += list(DECODER_LAYER_PATHS.values()) + list(_BASE_MODEL_PATHS)
    for path in dict.fromkeys(candidates):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return path
    raise ValueError(
        f"cannot find the decoder layers of a {type(model).__name__} (model_type={model_type!r}); "
        f"known architectures: {', '.join(sorted(DECODER_LAYER_PATHS))}. "
        "Pass the ModuleList's dotted name explicitly."
    )


def find_decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The dotted name and the ModuleList of the model's repeated blocks."""
    path = find_decoder_layers_path(model)
    layers = model.get_submodule(path)
    assert isinstance(layers, torch.nn.ModuleList)
    return path, layers

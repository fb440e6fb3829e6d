"""Where the decoder (or encoder) layers of a transformers model live."""

from __future__ import annotations

import torch

from compressor.architectures.registry import ARCHITECTURES, BY_MODEL_TYPE, model_type_of

__all__ = ["DECODER_LAYER_PATHS", "find_decoder_layers", "find_decoder_layers_path"]

#: model_type -> dotted path of the ModuleList holding the repeated blocks
DECODER_LAYER_PATHS: dict[str, str] = {
    model_type: architecture.layers for model_type, architecture in BY_MODEL_TYPE.items()
}
# where the list sits when the bare base model (no task head) is given
_BASE_MODEL_PATHS = tuple(dict.fromkeys(a.base_layers for a in ARCHITECTURES))


def find_decoder_layers_path(model: torch.nn.Module) -> str:
    """The dotted name of the ModuleList of decoder (or encoder) blocks.

    The model's own architecture is tried first, then every known layout, so an unlisted
    model that names its layers as a known one does is found too.

    :param model: the model
    :raises ValueError: naming the model type and the architectures that are known
    """
    model_type = model_type_of(model)
    candidates = []
    if model_type in BY_MODEL_TYPE:
        own = BY_MODEL_TYPE[model_type]
        candidates += [own.layers, own.base_layers]
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
    """The dotted name and the ModuleList of the model's repeated blocks.

    :param model: the model
    """
    path = find_decoder_layers_path(model)
    layers = model.get_submodule(path)
    assert isinstance(layers, torch.nn.ModuleList)
    return path, layers

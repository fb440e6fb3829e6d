"""Online rotations in checkpoints: compressed-tensors' ``transform_config`` in ``config.json``
and the transform matrices beside the weights, and putting them back on a reloaded model.

SpinQuant's online rotations (R4 on ``down_proj``'s input) are compressed-tensors transform
modules; ``save_compressed`` records their ``transform_config`` in the checkpoint's
``quantization_config`` (where compressed-tensors and vLLM read it) and saves their matrices
(``<module>.R4_input.weight``). transformers 5.24 keeps no ``transform_config`` when it loads a
checkpoint (its ``CompressedTensorsConfig`` has no such field), so ``from_pretrained`` alone
returns the model without them: ``restore_online_rotations`` applies the runtime part of each
online scheme (the inverses fused into the weights are already in the saved weights) and loads
the saved matrices. ``compressor.entrypoints.loading.load_model`` calls it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.transform import TransformConfig
from compressed_tensors.transform.factory.base import TransformBase
from loguru import logger

from compressor.checkpoint.kv_cache import _checkpoint_tensors
from compressor.modifiers.transform.spinquant.online import TRANSFORM_CONFIG_ATTR, online_part
from compressor.modifiers.transform.spinquant.online_attention import apply_online_rotations

__all__ = ["has_online_transforms", "restore_online_rotations", "saved_transform_config"]


def saved_transform_config(path: str | Path) -> TransformConfig | None:
    """The ``transform_config`` in a checkpoint's ``config.json`` (under
    ``quantization_config``), if any."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    quantization = json.loads(config_file.read_text()).get("quantization_config") or {}
    groups = (quantization.get(TRANSFORM_CONFIG_ATTR) or {}).get("config_groups")
    return TransformConfig.model_validate({"config_groups": groups}) if groups else None


def has_online_transforms(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds compressed-tensors transform modules applied at runtime."""
    return any(isinstance(module, TransformBase) for module in model.modules())


@torch.no_grad()
def restore_online_rotations(model: torch.nn.Module, path: str | Path) -> bool:
    """Give a model loaded from ``path`` the online rotations its checkpoint describes, with
    their saved matrices. Nothing happens when the checkpoint has none, or the model already
    holds transform modules (a loader that applied them itself).

    :return: whether rotations were restored here
    :raises ValueError: when a saved matrix does not fit the rebuilt one
    """
    path = Path(path)
    config = saved_transform_config(path)
    if config is None or has_online_transforms(model):
        return False
    runtime = online_part(config)
    if not runtime.config_groups:
        return False
    apply_online_rotations(model, runtime)
    setattr(model, TRANSFORM_CONFIG_ATTR, config)  # the whole config, as it was saved
    names = [
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, TransformBase)
        for key, value in module.named_parameters(recurse=False)
        if value is not None
    ]
    saved = _checkpoint_tensors(path, names)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in saved.items():
        param = params[name]
        if param.shape != tensor.shape:
            raise ValueError(
                f"{path}: the saved {name} has shape {tuple(tensor.shape)}, the rebuilt "
                f"rotation {tuple(param.shape)}"
            )
        param.copy_(tensor.to(param.dtype))
    logger.info(
        "restored online rotation(s) {} ({} saved matrix tensor(s) loaded)",
        list(runtime.config_groups),
        len(saved),
    )
    return True

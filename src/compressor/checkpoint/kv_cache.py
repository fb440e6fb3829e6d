"""The quantized key/value cache in checkpoints: its scheme in ``config.json`` and its
scales (``<attention>.k_scale`` / ``.v_scale``), as compressed-tensors writes them, and
putting it back on a reloaded model when the installed compressed-tensors could not (it
hooks attention forwards by an argument name transformers 5.24 renamed; see
``compressor.modifiers.quantization.kv_cache``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs
from loguru import logger
from safetensors import safe_open

from compressor.modifiers.quantization.kv_cache import (
    attach_kv_cache_quantization,
    match_kv_cache_modules,
)

__all__ = ["restore_kv_cache_quantization", "saved_kv_cache_scheme"]


def saved_kv_cache_scheme(path: str | Path) -> QuantizationArgs | None:
    """The ``kv_cache_scheme`` in a checkpoint's ``config.json``, if any."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    quantization = json.loads(config_file.read_text()).get("quantization_config") or {}
    scheme = quantization.get("kv_cache_scheme")
    return QuantizationArgs.model_validate(scheme) if scheme else None


def _checkpoint_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / weight_map[name] for name in names if name in weight_map}
    else:
        files = {name: path / "model.safetensors" for name in names}
    tensors = {}
    for name, file in files.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            if name in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                tensors[name] = f.get_tensor(name)
    return tensors


@torch.no_grad()
def restore_kv_cache_quantization(model: torch.nn.Module, path: str | Path) -> bool:
    """Give a model loaded from ``path`` the quantized key/value cache its checkpoint
    describes: the ``kv_cache`` quantizer on each attention module and its saved ``k_scale`` /
    ``v_scale``. Nothing happens when the checkpoint has no ``kv_cache_scheme`` or the
    attention modules already hold their scales (loaded by compressed-tensors itself).

    :return: whether the cache was restored here
    :raises ValueError: when the checkpoint lacks a scale an attention module needs
    """
    path = Path(path)
    args = saved_kv_cache_scheme(path)
    if args is None:
        return False
    modules = match_kv_cache_modules(model)
    if all(hasattr(m, "k_scale") and hasattr(m, "v_scale") for m in modules.values()):
        return False
    attach_kv_cache_quantization(model, modules, args)
    names = [f"{name}.{role}_scale" for name in modules for role in ("k", "v")]
    tensors = _checkpoint_tensors(path, names)
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(
            f"{path}: config.json has a kv_cache_scheme but the checkpoint lacks "
            f"{len(missing)} key/value scale(s), e.g. {missing[0]}"
        )
    for name, module in modules.items():
        for role in ("k", "v"):
            param = getattr(module, f"{role}_scale")
            param.copy_(tensors[f"{name}.{role}_scale"].reshape(param.shape).to(param.dtype))
    logger.info("restored the quantized key/value cache of {} attention module(s)", len(modules))
    return True

"""Load the model (and its tokenizer) that oneshot and the CLI work on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from loguru import logger

from compressor.checkpoint.kv_cache import restore_kv_cache_quantization

__all__ = ["layers_on_disk_map", "load_model", "load_tokenizer"]


def load_model(
    model: torch.nn.Module | str | Path, offload_folder: str | Path | None = None
) -> torch.nn.Module:
    """A loaded model as is; a checkpoint directory or a ``.gguf`` file loaded as a causal LM.

    A checkpoint with a quantized key/value cache gets it back (``restore_kv_cache_quantization``).

    A GGUF file is dequantized by transformers' GGUF loader (which needs the ``gguf`` package).

    :param offload_folder: load a checkpoint directory with its decoder layers offloaded to
        disk in this folder, the rest in memory (for a model larger than memory; the
        sequential pipeline then brings in one layer at a time)
    """
    if isinstance(model, torch.nn.Module):
        if offload_folder is not None:
            raise ValueError(
                "offload_folder applies when model is a checkpoint directory; a loaded model "
                "is used as it was loaded (load it with device_map and offload_folder instead)"
            )
        return model
    if not isinstance(model, str | Path):
        raise TypeError(
            "model must be a torch.nn.Module, a checkpoint directory or a .gguf file; "
            f"got {type(model).__name__}"
        )
    from transformers import AutoModelForCausalLM

    path = Path(model)
    if offload_folder is not None and not path.is_dir():
        raise ValueError(
            f"offload_folder applies to checkpoint directories; {str(model)!r} is not one "
            "(a .gguf file is dequantized in memory)"
        )
    if path.is_file() and path.suffix == ".gguf":
        logger.info("loading {} (GGUF, dequantized)", path)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        return _as_dense_model(loaded, path)
    if path.is_dir():
        if offload_folder is not None:
            logger.info("loading {} with its decoder layers offloaded to {}", path, offload_folder)
            return AutoModelForCausalLM.from_pretrained(
                path, device_map=layers_on_disk_map(path), offload_folder=str(offload_folder)
            )
        logger.info("loading {}", path)
        loaded = AutoModelForCausalLM.from_pretrained(path)
        restore_kv_cache_quantization(loaded, path)
        return loaded
    raise FileNotFoundError(
        f"model {str(model)!r} is neither a checkpoint directory nor a .gguf file"
    )


def layers_on_disk_map(path: str | Path) -> dict[str, str]:
    """An accelerate device map for the checkpoint at ``path``: each decoder layer on disk,
    everything else (embeddings, final norm, head) in CPU memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from compressor.architectures import find_decoder_layers

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    layers_path, layers = find_decoder_layers(skeleton)
    device_map: dict[str, str] = {}
    parent = ""
    for part in layers_path.split("."):  # siblings of each module on the way to the layers
        for name, _child in skeleton.get_submodule(parent).named_children():
            if name != part:
                device_map[f"{parent}.{name}" if parent else name] = "cpu"
        parent = f"{parent}.{part}" if parent else part
    for index in range(len(layers)):
        device_map[f"{layers_path}.{index}"] = "disk"
    return device_map


def _as_dense_model(model: Any, path: Path) -> Any:
    """Detach transformers' GGUF quantizer from a model whose weights it dequantized, so that
    it is an ordinary dense model (which compresses, and saves with ``save_pretrained``)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise ValueError(
            f"{path}: transformers kept {len(packed)} weight(s) packed in GGUF blocks (e.g. "
            f"{packed[0]}); compressor needs dense weights"
        )
    quantizer.remove_quantization_config(model)
    return model


def load_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """``tokenizer`` as given (a path is loaded), else the one beside ``model`` when it is a
    path, else None."""
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, str | Path):
        return tokenizer
    source = tokenizer if tokenizer is not None else model
    if not isinstance(source, str | Path):
        return None
    path = Path(source)
    try:
        if path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        if tokenizer is not None:
            raise
        logger.info("no tokenizer found beside {}: {}", path, err)
        return None

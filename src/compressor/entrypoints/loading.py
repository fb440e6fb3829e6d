"""Load the model (and its tokenizer) that oneshot and the CLI work on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from loguru import logger

__all__ = ["load_model", "load_tokenizer"]


def load_model(model: torch.nn.Module | str | Path) -> torch.nn.Module:
    """A loaded model as is; a checkpoint directory or a ``.gguf`` file loaded as a causal LM.

    A GGUF file is dequantized by transformers' GGUF loader (which needs the ``gguf`` package).
    """
    if isinstance(model, torch.nn.Module):
        return model
    if not isinstance(model, str | Path):
        raise TypeError(
            "model must be a torch.nn.Module, a checkpoint directory or a .gguf file; "
            f"got {type(model).__name__}"
        )
    from transformers import AutoModelForCausalLM

    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        logger.info("loading {} (GGUF, dequantized)", path)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        return _as_dense_model(loaded, path)
    if path.is_dir():
        logger.info("loading {}", path)
        return AutoModelForCausalLM.from_pretrained(path)
    raise FileNotFoundError(
        f"model {str(model)!r} is neither a checkpoint directory nor a .gguf file"
    )


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

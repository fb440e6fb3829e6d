"""Tied input and output embeddings, split into two tensors when one of them must change alone."""

from __future__ import annotations

import torch
from loguru import logger

__all__ = ["untie_word_embeddings"]


def untie_word_embeddings(model: torch.nn.Module, reason: str = "") -> bool:
    """Give the output head its own copy of tied input embeddings, and record it in the config.

    Rotations act on the embedding's output side and the head's input side, which differ;
    quantizing one of the two changes what the other would see, and a quantized head stores
    scales the tied embedding does not have (the checkpoint would not reload). So a shared
    tensor is split first. The model still saves and reloads as usual.

    :param reason: why, for the info log

    :return: whether the embeddings were tied
    """
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    embedding, head = get_in(), get_out()
    if embedding is None or head is None or head.weight is not embedding.weight:
        return False
    head.weight = torch.nn.Parameter(
        embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad
    )
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers >= 5
    if isinstance(tied, dict):
        for name, module in model.named_modules():
            if module is head:
                tied.pop(f"{name}.weight", None)
    logger.info("untied the input and output embeddings{}", f" ({reason})" if reason else "")
    return True

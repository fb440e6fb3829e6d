"""Perplexity over fixed windows of held-out text: the accuracy figure every suite reports."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

__all__ = ["perplexity", "token_windows"]


def token_windows(
    input_ids: torch.Tensor, window: int = 512, max_windows: int | None = None
) -> list[torch.Tensor]:
    """Cut a 1-D tensor of token ids into consecutive, non-overlapping windows.

    A last window shorter than ``window`` is dropped, so every figure covers the same tokens.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    count = input_ids.numel() // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(
            f"the text has {input_ids.numel()} tokens, fewer than one window of {window}"
        )
    return [input_ids[i * window : (i + 1) * window] for i in range(count)]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    window: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """exp(mean next-token negative log-likelihood) over fixed windows of ``input_ids``.

    :param model: a causal LM returning ``logits``
    :param input_ids: 1-D token ids of the evaluation text
    :param window: tokens per window (each scored independently, no overlap)
    :param max_windows: use only the first this many windows
    """
    windows = token_windows(input_ids, window, max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        batches = range(0, len(windows), batch_size)
        for i in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
            ids = torch.stack(windows[i : i + batch_size]).to(device)
            logits = model(input_ids=ids).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                ids[:, 1:].reshape(-1),
                reduction="sum",
            )
            total_nll += nll.item()
            total_tokens += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)

"""What every pipeline shares: evaluation mode without caches, and moving batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["calibration_mode", "first_output", "model_device", "to_device"]


@contextlib.contextmanager
def calibration_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluation mode, no gradients and no key/value cache; restored on exit."""
    config: Any = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    was_training = model.training
    model.eval()
    if use_cache is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        if use_cache is not None:
            config.use_cache = use_cache
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """Move tensors, and tensors inside tuples, lists and dicts, to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    return value


def first_output(output: Any) -> Any:
    """A module's main output: the first element when it returns a tuple or list (a decoder
    layer's hidden states, an attention's output)."""
    return output[0] if isinstance(output, tuple | list) else output

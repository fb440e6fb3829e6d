"""What every pipeline shares: evaluation mode without caches, and moving batches."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "calibration_mode",
    "call_model",
    "check_model_takes",
    "first_output",
    "model_device",
    "to_device",
]


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


def _takes_keywords(model: torch.nn.Module, names: Iterator[str] | list[str]) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read: assume keywords work
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return True
    keywords = {
        n
        for n, p in parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return set(names) <= keywords


def call_model(model: torch.nn.Module, batch: Mapping[str, Any]) -> Any:
    """Run ``batch`` through ``model``: as keyword arguments when its forward takes them (a
    transformers model: ``input_ids``, ``attention_mask``), else, for a batch of one tensor
    (a DataLoader of plain tensors), that tensor as the one positional input (an
    ``nn.Sequential`` conv net)."""
    if _takes_keywords(model, list(batch)) or len(batch) != 1:
        return model(**batch)
    return model(next(iter(batch.values())))


def check_model_takes(model: torch.nn.Module, batch: Mapping[str, Any]) -> None:
    """Refuse, before calibration, a batch that ``call_model`` cannot pass to ``model``.

    :param model: the model
    :param batch: a calibration batch
    :raises TypeError: naming the forward's signature and the batch's keys
    """
    if len(batch) == 1 or _takes_keywords(model, list(batch)):
        return
    signature = inspect.signature(model.forward)
    raise TypeError(
        f"{type(model).__name__}.forward{signature} takes no keyword argument(s) "
        f"{sorted(set(batch))}, which the calibration batches hold; give a model whose forward "
        "takes them, or a DataLoader yielding one input tensor per batch"
    )

"""What every pipeline shares: evaluation mode without caches, moving batches, and ending a
forward early at a module whose inputs are all that is needed."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "StopForward",
    "calibration_mode",
    "call_model",
    "check_model_takes",
    "first_output",
    "model_device",
    "run_until_stopped",
    "stop_forward_after",
    "stop_forward_at",
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


class StopForward(Exception):
    """Ends a forward at a module: what it and everything after it would compute is not
    needed. Raised by the hook of ``stop_forward_at``, caught by ``run_until_stopped``.

    :param args: the positional arguments the module was about to receive
    :param kwargs: its keyword arguments
    """

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.module_args = args
        self.module_kwargs = kwargs


@contextlib.contextmanager
def stop_forward_at(module: torch.nn.Module, *, before_other_hooks: bool = False) -> Iterator[None]:
    """End every forward that reaches ``module`` there (``StopForward``), until the block ends.

    :param module: the module whose inputs are the last thing needed
    :param before_other_hooks: stop before the module's other forward pre-hooks run, so that
        the modifiers' hooks do not see the call; by default they run first and see its inputs
    """

    def stop(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        raise StopForward(args, kwargs)

    handle = module.register_forward_pre_hook(stop, with_kwargs=True, prepend=before_other_hooks)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def stop_forward_after(module: torch.nn.Module) -> Iterator[None]:
    """End every forward there once ``module`` has returned and its other forward hooks (the
    modifiers', registered before) have seen its output, until the block ends."""

    def stop(_module: torch.nn.Module, args: tuple, _output: Any) -> None:
        raise StopForward(args, {})

    handle = module.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def run_until_stopped(
    forward: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Call ``forward(*args, **kwargs)``, which a ``stop_forward_at`` block may end early.

    :return: the positional and keyword arguments the stopping module was about to receive,
        or None when the forward ran to its end
    """
    try:
        forward(*args, **kwargs)
    except StopForward as stop:
        return stop.module_args, stop.module_kwargs
    return None


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

"""torch parametrizations that keep a parameter's gradient hooks (DistributedDataParallel's).

``torch.nn.utils.parametrize`` moves a weight into ``parametrizations.<name>.original`` with
``original.set_(...)``, even when the tensor is set to itself, and ``set_`` gives the
parameter a new gradient accumulator. DistributedDataParallel hooks the accumulators it
found when it wrapped the model, so a parametrization added afterwards (quantization-aware
training, learnable pruning scores: modifiers start after the Trainer has wrapped the model)
leaves those hooks dead, and the next step fails with "Expected to have finished reduction
in the prior iteration". These wrappers make that step a no-op when the tensor is set to
itself, and an in-place copy when a parametrization is removed with its value kept, so the
parameter object, its storage and its accumulator all stay the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.utils import parametrize

from compressor.utils.fsdp import is_fully_sharded_module

__all__ = ["register_parametrization", "remove_parametrizations"]


@contextlib.contextmanager
def _same_parameter_objects() -> Iterator[None]:
    original_set = parametrize._maybe_set

    def keep(dest: torch.Tensor, src: torch.Tensor) -> None:
        if dest is src:
            return
        if (
            dest.shape == src.shape
            and dest.dtype == src.dtype
            and dest.device == src.device
            and type(dest) in (torch.Tensor, torch.nn.Parameter)
        ):
            with torch.no_grad():
                dest.copy_(src)
            return
        original_set(dest, src)

    parametrize._maybe_set = keep
    try:
        yield
    finally:
        parametrize._maybe_set = original_set


def register_parametrization(
    module: torch.nn.Module,
    name: str,
    parametrization: torch.nn.Module,
    *,
    where: str = "",
    **kwargs: Any,
) -> None:
    """``torch.nn.utils.parametrize.register_parametrization``, keeping the parameter object
    and its gradient accumulator.

    A tensor already parametrized is refused: removing one modifier's parametrization
    removes every one on that tensor (torch has no single removal), so a second modifier
    would silently stop applying when the first one ends.

    A weight FSDP2 (``fully_shard``) manages is refused too: FSDP2 sets the whole tensor it
    gathers on the module for each forward, which a parametrization (computing from the
    sharded parameter underneath) would never see.

    :param where: the module's name, for the error
    """
    if is_fully_sharded_module(module):
        raise ValueError(
            f"{where or type(module).__name__}.{name} is sharded with FSDP2 (fully_shard), "
            f"which a parametrization ({type(parametrization).__name__}) cannot apply to: "
            "FSDP2 gathers the whole tensor for each forward and a parametrization would "
            "compute from the shard; under fully_shard quantization-aware training and l1 "
            "pruning masks are supported, learnable masks and scores are not"
        )
    if parametrize.is_parametrized(module, name):
        existing = ", ".join(type(p).__name__ for p in module.parametrizations[name])
        raise ValueError(
            f"{where or type(module).__name__}.{name} is already reparametrized by {existing}: "
            "two training-time modifiers that reparametrize one weight (learnable TopK "
            "pruning scores, quantization-aware training) cannot share it; give them "
            "disjoint targets (magnitude/l1 pruning masks do combine with quantization-aware "
            "training)"
        )
    with _same_parameter_objects():
        parametrize.register_parametrization(module, name, parametrization, **kwargs)


def remove_parametrizations(
    module: torch.nn.Module, name: str, leave_parametrized: bool = True
) -> None:
    """``torch.nn.utils.parametrize.remove_parametrizations``; with ``leave_parametrized``
    the value is copied into the original parameter in place."""
    with _same_parameter_objects():
        parametrize.remove_parametrizations(module, name, leave_parametrized=leave_parametrized)

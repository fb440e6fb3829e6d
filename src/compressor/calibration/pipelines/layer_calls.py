"""A decoder layer's cached calls, and consecutive calls merged into one forward.

The sequential pipeline caches the first decoder layer's calls (``LayerInputs``) and runs
them through every layer in turn. Calls that differ only in their hidden states (equal-length
batches, the usual case) can run through a layer together (``MergedCalls``): larger matrix
products run faster on CPU, and the result is the same, which ``merging_is_exact`` checks on
the first layer. The staged calibration (``staged.py``) runs the same merged calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from loguru import logger

from compressor.calibration.pipelines.common import first_output
from compressor.modifiers.hooks import HooksMixin

__all__ = ["LayerInputs", "MergedCalls", "merge_calls", "merging_is_exact", "unmerge"]


@dataclass
class LayerInputs:
    """The positional and keyword arguments of one call of a decoder layer."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden_states(self, hidden_states: torch.Tensor) -> LayerInputs:
        """The same call with other hidden states (the other arguments are shared)."""
        if self.args:
            return LayerInputs((hidden_states, *self.args[1:]), self.kwargs)
        return LayerInputs(self.args, {**self.kwargs, "hidden_states": hidden_states})


@dataclass(frozen=True)
class MergedCalls:
    """Consecutive cached calls of a layer run as one forward.

    :param call: their hidden states concatenated along the batch dimension, with the other
        arguments they share
    :param batch_sizes: each call's batch size, in order (one entry: a call on its own)
    """

    call: LayerInputs
    batch_sizes: tuple[int, ...]

    @classmethod
    def alone(cls, call: LayerInputs) -> MergedCalls:
        """A call on its own."""
        return cls(call, (call.hidden_states.shape[0],))

    def calls(self) -> list[LayerInputs]:
        """The calls one by one (views into the merged hidden states)."""
        if len(self.batch_sizes) == 1:
            return [self.call]
        hidden = self.call.hidden_states.split(self.batch_sizes)
        return [self.call.with_hidden_states(h) for h in hidden]

    def with_hidden_states(self, hidden_states: torch.Tensor) -> MergedCalls:
        """The same calls with other hidden states (a layer's outputs for them)."""
        return MergedCalls(self.call.with_hidden_states(hidden_states), self.batch_sizes)


def merge_calls(inputs: list[LayerInputs], max_tokens: int, max_elements: int) -> list[MergedCalls]:
    """Group consecutive calls whose hidden states have the same shape past the batch
    dimension and whose other arguments are equal, up to ``max_tokens`` tokens and
    ``max_elements`` hidden-state values a group.

    ``inputs`` is emptied group by group as the merged copies are made, so the cache is never
    held twice (it can be the largest thing in memory)."""
    merged = []
    for group in _mergeable_runs(inputs, max_tokens, max_elements):
        calls = [inputs[position] for position in group]
        if len(calls) == 1:
            merged.append(MergedCalls.alone(calls[0]))
        else:
            hidden = torch.cat([call.hidden_states for call in calls])
            sizes = tuple(call.hidden_states.shape[0] for call in calls)
            merged.append(MergedCalls(calls[0].with_hidden_states(hidden), sizes))
        for position in group:  # release the calls' own hidden states now
            inputs[position] = merged[-1].call
        del calls
    inputs.clear()
    return merged


def _mergeable_runs(
    inputs: list[LayerInputs], max_tokens: int, max_elements: int
) -> list[list[int]]:
    """The positions of ``inputs`` in groups of consecutive calls that may run as one."""
    groups: list[list[int]] = []
    tokens = elements = 0
    for position, call in enumerate(inputs):
        hidden = call.hidden_states
        size, length = hidden.numel(), hidden.shape[:-1].numel()
        if (
            groups
            and tokens + length <= max_tokens
            and elements + size <= max_elements
            and _same_but_hidden(inputs[groups[-1][0]], call)
        ):
            groups[-1].append(position)
            tokens, elements = tokens + length, elements + size
        else:
            groups.append([position])
            tokens, elements = length, size
    return groups


def unmerge(merged: list[MergedCalls]) -> list[MergedCalls]:
    """Every call on its own again."""
    return [MergedCalls.alone(call) for m in merged for call in m.calls()]


def _same_but_hidden(a: LayerInputs, b: LayerInputs) -> bool:
    """Whether two calls differ at most in their hidden states' values and batch size."""
    ha, hb = a.hidden_states, b.hidden_states
    if ha.shape[1:] != hb.shape[1:] or ha.dtype != hb.dtype or ha.device != hb.device:
        return False
    rest_a = (a.args[1:], {k: v for k, v in a.kwargs.items() if k != "hidden_states"})
    rest_b = (b.args[1:], {k: v for k, v in b.kwargs.items() if k != "hidden_states"})
    return _equal(rest_a, rest_b)


def _equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if a is None or b is None or isinstance(a, bool | int | float | str):
        return type(a) is type(b) and a == b
    return False  # other objects (a cache, a config): only the very same one is equal


def merging_is_exact(layer: torch.nn.Module, inputs: list[MergedCalls]) -> bool:
    """Whether ``layer`` gives the first merged call the outputs of its calls run one by one
    (the other arguments, taken from the first call, must broadcast over the larger batch).
    True when nothing is merged."""
    if not inputs or len(inputs[0].batch_sizes) == 1:
        return True
    merged = inputs[0]
    with HooksMixin.disable_hooks():
        separate = torch.cat([first_output(layer(*c.args, **c.kwargs)) for c in merged.calls()])
        try:
            together = first_output(layer(*merged.call.args, **merged.call.kwargs))
        except Exception as error:  # e.g. a mask whose batch dimension does not broadcast
            logger.debug("merged calls fail on {}: {}", type(layer).__name__, error)
            return False
    if together.shape != separate.shape:
        return False
    return bool((together - separate).abs().max() <= 1e-4 * separate.abs().max().clamp_min(1.0))

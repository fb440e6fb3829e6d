"""What one pruning mask covers: a ``Coupling`` of modules whose units are pruned together.

Structured pruning removes a unit (a row, a head, a channel) from the module that produces it
and from every module that reads it; those modules are coupled, and one mask over the units
covers them all. Unstructured pruning has couplings of one module whose units are its single
weights. (Pruning's own word, so as not to be read as a recipe group, a quantization config
group or a quantization ``group_size``.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.utils import parametrize

from compressor.architectures import BATCH_NORMS

__all__ = ["Member", "Coupling", "latent_weight", "member_tensors"]


@dataclass(frozen=True)
class Member:
    """A module whose tensors a coupling's mask covers.

    :param name: the module's dotted name in the model
    :param module: the module (Linear, Conv2d or BatchNorm)
    :param dim: None for an elementwise mask of the weight; 0 for output rows or channels
        (the bias and BatchNorm affine vectors follow); 1 for input columns or channels
    """

    name: str
    module: torch.nn.Module = field(compare=False, repr=False)
    dim: int | None = None

    @property
    def is_norm(self) -> bool:
        return isinstance(self.module, BATCH_NORMS)


@dataclass
class Coupling:
    """Modules whose units are pruned together under one mask: the entries of one weight, or
    the rows / heads / channels of coupled modules (a unit is a contiguous block of
    ``size // n_units`` indices of every member).

    :param name: a readable name (the producing module)
    :param members: the modules the mask covers
    :param n_units: how many units (None: every weight entry of a single member is a unit)
    :param config: model config keys set to ``kept units * value`` after the clean-up
    :param attributes: ``"relative.module.attr"`` set to ``kept units * value`` after clean-up
    :param block: the module the ``attributes`` paths are relative to
    """

    name: str
    members: list[Member]
    n_units: int | None = None
    config: dict[str, int] = field(default_factory=dict)
    attributes: dict[str, int] = field(default_factory=dict)
    block: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def structured(self) -> bool:
        return self.n_units is not None

    def scored_members(self) -> list[Member]:
        """The members whose weights define a unit's importance (norm layers excluded)."""
        return [m for m in self.members if not m.is_norm]


def member_tensors(member: Member) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a member's mask covers: the weight, plus the bias (and BatchNorm's
    affine vectors) when rows or output channels are masked."""
    names = ["weight"]
    if member.dim == 0:
        names.append("bias")
    out = []
    for name in names:
        value = _latent(member.module, name)
        if isinstance(value, torch.Tensor):
            out.append((name, value))
    return out


def latent_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight Parameter itself: under a parametrization (quantization-aware training
    fake-quantizes ``module.weight`` on every read), the latent weight it computes from."""
    weight = _latent(module, "weight")
    assert isinstance(weight, torch.Tensor)
    return weight


def _latent(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    # a parametrized tensor is recomputed on every read: masks and scores belong to the
    # Parameter underneath
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name, None)

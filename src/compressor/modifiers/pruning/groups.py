"""What one mask covers: a single weight (unstructured) or units shared by coupled modules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressor.architectures import BATCH_NORMS

__all__ = ["Member", "PruneGroup", "member_tensors"]


@dataclass(frozen=True)
class Member:
    """A module whose tensors a group's mask covers.

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
class PruneGroup:
    """Units pruned together: one weight's entries, or rows / heads / channels of coupled
    modules (a unit is a contiguous block of ``size // n_units`` indices of every member).

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
        value = getattr(member.module, name, None)
        if isinstance(value, torch.Tensor):
            out.append((name, value))
    return out

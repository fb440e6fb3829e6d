"""One expert's matrices out of fused 3-D expert parameters, and back (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.architectures.moe import ExpertsLayout

__all__ = ["ExpertMatrices", "expert_matrices", "fused_matrices"]


@dataclass(frozen=True)
class ExpertMatrices:
    """One expert's matrices in the Linear convention ``[out, in]``, with biases or None."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def _split_gate_up(fused: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up rows of a ``[2 * intermediate, ...]`` tensor."""
    if interleaved:
        return fused[0::2], fused[1::2]
    half = fused.shape[0] // 2
    return fused[:half], fused[half:]


def expert_matrices(
    layout: ExpertsLayout,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    index: int,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> ExpertMatrices:
    """Expert ``index``'s gate, up and down matrices (``[out, in]``) from fused parameters.

    :param layout: how the fused tensors are laid out
    :param gate_up: the fused gate-and-up parameter ``[experts, ...]``
    :param down: the down parameter ``[experts, ...]``
    :param index: the expert
    :param gate_up_bias: ``[experts, 2 * intermediate]`` when ``layout.bias``
    :param down_bias: ``[experts, hidden]`` when ``layout.bias``
    """
    fused, down_matrix = gate_up[index], down[index]
    if layout.transposed:
        fused, down_matrix = fused.T, down_matrix.T
    gate, up = _split_gate_up(fused, layout.interleaved)
    biases: tuple[torch.Tensor | None, ...] = (None, None, None)
    if gate_up_bias is not None and down_bias is not None:
        biases = (*_split_gate_up(gate_up_bias[index], layout.interleaved), down_bias[index])
    return ExpertMatrices(gate, up, down_matrix, *biases)


def fused_matrices(
    layout: ExpertsLayout, experts: list[ExpertMatrices]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The fused ``gate_up``, ``down`` (and biases) of ``experts``: the inverse of
    ``expert_matrices``."""

    def join(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if layout.interleaved:
            return torch.stack([gate, up], dim=1).reshape(-1, *gate.shape[1:])
        return torch.cat([gate, up], dim=0)

    gate_up = torch.stack([join(e.gate, e.up) for e in experts])
    down = torch.stack([e.down for e in experts])
    if layout.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gate_up_bias = down_bias = None
    if layout.bias:
        gate_up_bias = torch.stack([join(e.gate_bias, e.up_bias) for e in experts])  # type: ignore[arg-type]
        down_bias = torch.stack([e.down_bias for e in experts])  # type: ignore[misc]
    return gate_up.contiguous(), down.contiguous(), gate_up_bias, down_bias

"""Whole-expert pruning of mixture-of-experts blocks: REAP saliency and physical removal.

REAP (Router-weighted Expert Activation Pruning; Lasby et al. 2025, "REAP the Experts:
Why Pruning Prevails for One-Shot MoE Compression") scores an
expert by the mean, over the calibration tokens routed to it, of the router's gate weight
times the norm of the expert's output: an expert that is rarely chosen, chosen with a small
weight, or that adds little when chosen contributes least to the block's output. The
functions here work on the fused ``...Experts`` modules transformers 5 builds (3-D
parameters indexed by expert first), which is where removal is a single index along the
first dimension of every per-expert tensor, and the layout the checkpoint is saved in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressor.architectures.moe import UNFOLDED_MARKER, MoEBlock

__all__ = [
    "ExpertSaliency",
    "check_prunable",
    "expert_output_norms",
    "experts_to_keep",
    "remove_experts",
]


@dataclass
class ExpertSaliency:
    """Running REAP sums of one sparse block.

    :param num_experts: the block's routed experts
    :param total: per expert, the sum over its routed tokens of gate weight x output norm
    :param tokens: per expert, how many (token, expert) routings it received
    """

    num_experts: int
    total: torch.Tensor = field(init=False)
    tokens: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.num_experts, dtype=torch.float64)
        self.tokens = torch.zeros(self.num_experts, dtype=torch.long)

    def add(
        self,
        experts: torch.nn.Module,
        hidden: torch.Tensor,
        index: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        """Add one forward's routings: ``hidden [tokens, hidden]``, ``index`` and
        ``weights [tokens, top_k]`` as the block hands them to its experts module."""
        for expert in torch.unique(index).tolist():
            if not 0 <= expert < self.num_experts:
                continue  # the fused forward's "no expert" slot
            token, slot = torch.where(index == expert)
            norms = expert_output_norms(experts, hidden[token], expert)
            gate = weights[token, slot].to(torch.float64)
            self.total[expert] += (gate * norms.to(torch.float64)).sum().cpu()
            self.tokens[expert] += token.numel()

    def scores(self) -> torch.Tensor:
        """Per expert, the mean gate-weighted output norm (0 for an expert never routed)."""
        return self.total / self.tokens.clamp(min=1)


@torch.no_grad()
def expert_output_norms(
    experts: torch.nn.Module, hidden: torch.Tensor, expert: int
) -> torch.Tensor:
    """The L2 norm of one expert's (unweighted) output for each row of ``hidden``.

    The experts module's own forward computes it (every token routed to ``expert`` alone
    with weight 1), so the family's activation, layout and biases are those it runs with;
    the forward is called without the module's hooks, so calibration hooks on it do not see
    these extra calls."""
    rows = hidden.shape[0]
    index = torch.full((rows, 1), expert, dtype=torch.long, device=hidden.device)
    ones = torch.ones((rows, 1), dtype=hidden.dtype, device=hidden.device)
    output = type(experts).forward(experts, hidden, index, ones)
    return output.float().norm(dim=-1)


def check_prunable(
    block: MoEBlock, experts: torch.nn.Module, router: torch.nn.Module, num_to_prune: int
) -> None:
    """Refuse a block whose experts cannot be removed here, before any work.

    :raises ValueError: naming the block and the reason (fewer experts left than top-k,
        group-limited routing, experts unfolded into Linears)
    """
    if getattr(experts, UNFOLDED_MARKER, False):
        raise ValueError(
            f"{block.experts}: the experts are unfolded into one Linear per expert (another "
            "modifier of the recipe prepared them); put ExpertPruningModifier in its own "
            "recipe stage before the modifiers that compress experts"
        )
    left = block.num_experts - num_to_prune
    if block.top_k is not None and left < block.top_k:
        raise ValueError(
            f"num_experts_to_prune={num_to_prune}: {block.name} has {block.num_experts} "
            f"experts routed top-{block.top_k} ({block.layout.top_k_key}), so at most "
            f"{block.num_experts - block.top_k} can be pruned; {left} would remain"
        )
    groups = getattr(router, "num_group", None) or getattr(router, "n_group", None)
    if isinstance(groups, int) and groups > 1:
        raise ValueError(
            f"{block.router} routes within {groups} expert groups (n_group={groups}); "
            "pruning whole experts would unbalance the groups and is not supported"
        )


def experts_to_keep(scores: torch.Tensor, num_to_prune: int) -> torch.Tensor:
    """The indices of the experts kept: all but the ``num_to_prune`` of least score, in
    their original order (ties broken towards the lower index being kept)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[: scores.numel() - num_to_prune].sort().values


@torch.no_grad()
def remove_experts(
    experts: torch.nn.Module, router: torch.nn.Module, keep: torch.Tensor, num_experts: int
) -> None:
    """Keep only the experts ``keep`` (indices) in a fused experts module and its router.

    Every parameter and buffer of either module whose first dimension is ``num_experts``
    is indexed (fused weights and biases, router rows, router bias and score-correction
    bias), and their ``num_experts`` attributes updated, so the block routes among the kept
    experts in their original order.
    """
    for module in (experts, router):
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() >= 1 and param.shape[0] == num_experts:
                kept = torch.nn.Parameter(
                    param.data[keep.to(param.device)].clone(), requires_grad=param.requires_grad
                )
                setattr(module, name, kept)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.dim() >= 1 and buffer.shape[0] == num_experts:
                setattr(module, name, buffer[keep.to(buffer.device)].clone())
        for attribute in ("num_experts", "num_local_experts", "n_routed_experts"):
            if isinstance(getattr(module, attribute, None), int):
                setattr(module, attribute, int(keep.numel()))

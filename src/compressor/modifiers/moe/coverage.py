"""Every expert calibrated: all-expert calibration and the per-expert token counts.

With top-k routing an expert sees only the tokens routed to it, so over a calibration set
most experts see a small share of it and some see none: their GPTQ Hessians, activation
ranges and pruning statistics come from a handful of tokens (a Hessian from fewer tokens
than its columns is singular). All-expert calibration (llm-compressor's remedy) runs every
token through every expert while calibrating, so every expert's Linears collect statistics
from the whole set, while the block's output still sums only the routed experts (the next
layers see what the model computes). ``ExpertCoverage`` switches it on for the experts
modules of a model, counts the tokens each expert was routed and saw, logs them, and warns
for experts whose statistics come from fewer tokens than a threshold.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import torch
from loguru import logger
from pydantic import BaseModel, Field

from compressor.architectures.moe import MoELayout
from compressor.modifiers.moe.experts import ExpertMLP, LinearExperts

__all__ = ["ExpertCalibrationFields", "ExpertCoverage", "starved_experts"]


class _Hooks(Protocol):
    def register_hook(self, target: Any, hook: Any, kind: Any, **kwargs: Any) -> Any: ...


class ExpertCalibrationFields(BaseModel):
    """The mixture-of-experts fields of a compressing modifier.

    :param calibrate_all_experts: while calibrating, run every token through every expert
        so each expert's statistics come from the whole calibration set; the layer's output
        keeps the router's choice. On by default; off, each expert sees only the tokens
        routed to it, and the experts left with too few are named in a warning
    :param min_expert_tokens: warn for an expert whose statistics come from fewer tokens;
        unset: the experts' input width (a Hessian from fewer tokens than its columns is
        singular)
    :param moe_mappings: layouts of mixture-of-experts families the library's table lacks
        (``compressor.architectures.moe.MoELayout``: ``family``, ``model_types``,
        ``block_class``, ``experts`` with ``experts_class``, ``gate_up``, ``down``,
        ``transposed``, ``interleaved``, ``bias``, ``checkpoint_names``; ``router``,
        ``shared_experts``, ``shared_expert_gate``, ``num_experts_key``, ``top_k_key``)
    """

    calibrate_all_experts: bool = True
    min_expert_tokens: int | None = Field(default=None, ge=1)
    moe_mappings: list[MoELayout] = []


def starved_experts(seen: torch.Tensor, threshold: int) -> list[int]:
    """The experts whose statistics come from fewer than ``threshold`` tokens.

    :param seen: tokens each expert's Linears saw, ``[experts]``
    :param threshold: the fewest tokens that is enough
    """
    return [int(i) for i in torch.nonzero(seen < threshold).flatten()]


class ExpertCoverage:
    """All-expert calibration and token counts over the ``LinearExperts`` of a model.

    :param model: the model (its experts already unfolded)
    :param all_experts: run every token through every expert while calibrating
    :param hooks: registers the counting hooks (the modifier, which removes them at its end)
    :param owner: the modifier, for logs
    :param min_tokens: the warning threshold (None: each experts module's input width)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        all_experts: bool,
        hooks: _Hooks,
        owner: str,
        min_tokens: int | None = None,
    ) -> None:
        self.experts = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, LinearExperts)
        }
        self.all_experts, self.hooks, self.owner = all_experts, hooks, owner
        self.min_tokens = min_tokens
        self.routed: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._active = False

    @classmethod
    def started_for(cls, modifier: Any, model: torch.nn.Module) -> ExpertCoverage:
        """The coverage of ``modifier``'s experts in ``model``, started: its
        ``calibrate_all_experts`` and ``min_expert_tokens`` fields, its hooks, its name."""
        coverage = cls(
            model,
            modifier.calibrate_all_experts,
            hooks=modifier,
            owner=type(modifier).__name__,
            min_tokens=modifier.min_expert_tokens,
        )
        coverage.start()
        return coverage

    def start(self) -> None:
        """Count from now on (and run every expert on every token, when asked)."""
        if self._active:
            return
        self._active = True
        for name, module in self.experts.items():
            self.routed[name] = torch.zeros(module.num_experts, dtype=torch.long)
            self.tokens[name] = 0
            if self.all_experts:
                module.all_experts_requests += 1
            self.hooks.register_hook(module, self._counter(name, module), "forward_pre")

    def _counter(self, name: str, module: LinearExperts) -> Any:
        def count(_: torch.nn.Module, args: tuple) -> None:
            if not self._active:
                return
            hidden_states, top_k_index = args[0], args[1]
            self.routed[name] += torch.bincount(
                top_k_index.flatten().cpu(), minlength=module.num_experts
            )[: module.num_experts]
            self.tokens[name] += int(hidden_states.shape[0])

        return count

    def seen(self, name: str) -> torch.Tensor:
        """Tokens each expert of ``name`` calibrated on so far."""
        if self.all_experts:
            return torch.full_like(self.routed[name], self.tokens[name])
        return self.routed[name].clone()

    def end(self) -> dict[str, list[int]]:
        """Stop, log the counts, warn for starved experts; return them by experts module."""
        if not self._active:
            return {}
        self._active = False
        starved: dict[str, list[int]] = {}
        for name, module in self.experts.items():
            if self.all_experts:
                module.all_experts_requests -= 1
            seen = self.seen(name)
            first = cast(ExpertMLP, module[0]).projections()[0]
            threshold = self.min_tokens or first.in_features
            logger.info(
                "{}: {} routed tokens per expert {}; statistics from {} token(s) {}",
                self.owner,
                name,
                self.routed[name].tolist(),
                self.tokens[name] if self.all_experts else "routed",
                "each (all-expert calibration)" if self.all_experts else "per expert",
            )
            hungry = starved_experts(seen, threshold)
            if hungry:
                starved[name] = hungry
        if starved:
            listed = [
                f"{name}.{i} ({int(self.seen(name)[i])} tokens)"
                for name, indices in starved.items()
                for i in indices
            ]
            logger.warning(
                "{}: {} starved expert(s), calibrated on fewer tokens than {}: {}{}",
                self.owner,
                len(listed),
                self.min_tokens or "their input width",
                ", ".join(listed),
                ""
                if self.all_experts
                else "; calibrate_all_experts: true runs every token through every expert",
            )
        return starved

"""What AWQModifier's ``apply_clip`` keeps between the calibration forwards and the clipping:
the linears it clips, grouped by the input they share, and each group's input Gram matrix."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from compressed_tensors.offload import update_offload_parameter
from loguru import logger

from compressor.modifiers.transform.awq.clip import clip_problem, clip_weight
from compressor.modifiers.transform.smoothing import (
    ResolvedSmoothing,
    refresh_module_weight_qparams,
)

__all__ = ["ClipGroup", "WeightClipping", "clip_groups"]


@dataclass
class ClipGroup:
    """Linears reading one input: a mapping's balance layers (``mapping``: its smooth layer,
    whose folded scales divide the input) or one other linear of a searched parent module
    (o_proj where grouped-query attention leaves v_proj -> o_proj out)."""

    key: str
    linears: list[tuple[str, torch.nn.Linear]]
    mapping: str | None = None


def clip_groups(resolved: Iterable[ResolvedSmoothing]) -> list[ClipGroup]:
    """Each mapping's balance layers, then every other linear inside the mappings' parents."""
    resolved = list(resolved)
    groups = [
        ClipGroup(r.smooth_name, list(zip(r.balance_names, r.balances, strict=True)), r.smooth_name)
        for r in resolved
    ]
    seen = {id(m) for r in resolved for m in r.balances}
    for r in resolved:
        for sub, module in r.parent.named_modules():
            if isinstance(module, torch.nn.Linear) and id(module) not in seen:
                seen.add(id(module))
                name = f"{r.parent_name}.{sub}" if sub else r.parent_name
                groups.append(ClipGroup(name, [(name, module)]))
    return groups


@dataclass
class WeightClipping:
    """Gram matrices ``X^T X`` of each group's calibration inputs, kept as the input the
    linears see once the scales are folded; each group clipped when its layer is done."""

    groups: list[ClipGroup]
    grams: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, key: str, x: torch.Tensor) -> None:
        """Add the inputs ``x`` (tokens, columns) of group ``key``."""
        x = x.detach().float()
        gram = x.T @ x
        if key in self.grams:
            self.grams[key] += gram
        else:
            self.grams[key] = gram

    def rescale(self, key: str, scales: torch.Tensor) -> None:
        """The fold divided the group's input by ``scales``: so is its Gram matrix, twice."""
        gram = self.grams.get(key)
        if gram is not None:
            s = scales.to(gram.device, gram.dtype)
            gram.div_(s.unsqueeze(1) * s.unsqueeze(0))

    @torch.no_grad()
    def clip_ready(self, inside: set[int] | None, done: set[str]) -> None:
        """Clip every group that has inputs, lies inside ``inside`` (module ids; None: every
        group) and whose mapping's scales are folded (in ``done``); their Grams are released.
        Linears without quantized weights, or with weights clipping does not search, are left
        as they are, with a log line."""
        for group in self.groups:
            if group.key not in self.grams or (group.mapping and group.mapping not in done):
                continue
            if inside is not None and any(id(m) not in inside for _, m in group.linears):
                continue
            gram = self.grams.pop(group.key)
            for name, module in group.linears:
                scheme = getattr(module, "quantization_scheme", None)
                args = getattr(scheme, "weights", None)
                problem = "unquantized weights" if args is None else clip_problem(args)
                if problem is not None:
                    logger.info("AWQModifier: {} not clipped: {}", name, problem)
                    continue
                clipped, before, after = clip_weight(module.weight, gram, args, name)
                update_offload_parameter(module, "weight", clipped)
                refresh_module_weight_qparams(name, module)
                logger.debug(
                    "AWQ clip {}: output error {:.4g} unclipped, {:.4g} clipped",
                    name,
                    before,
                    after,
                )

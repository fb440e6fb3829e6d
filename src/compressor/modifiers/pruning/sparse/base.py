"""SparsePruningModifier: individual weights, unstructured or N:M (2:4)."""

from __future__ import annotations

from typing import ClassVar

import torch
from compressed_tensors.utils import is_match, match_named_modules
from loguru import logger
from pydantic import field_validator, model_validator

from compressor.modifiers.base import Modifier
from compressor.modifiers.pruning.base import PruningModifierBase
from compressor.modifiers.pruning.coupling import Coupling, Member
from compressor.modifiers.pruning.masks import ScoreMask
from compressor.modifiers.pruning.scores import nm_mask
from compressor.modifiers.pruning.snip import parse_block_pattern, snip_layers
from compressor.utils.conv1d import conv1d_hint

__all__ = ["SparsePruningModifier", "parse_mask_structure"]

_PRUNABLE = (torch.nn.Linear, torch.nn.Conv2d)


def parse_mask_structure(value: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M)."""
    if value == "unstructured":
        return None
    parts = value.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = (int(p) for p in parts)
        if 0 < n < m:
            return n, m
    raise ValueError(
        f"mask_structure must be 'unstructured' or 'N:M' with 0 < N < M (such as '2:4'), "
        f"got {value!r}"
    )


@Modifier.register("SparsePruning")
class SparsePruningModifier(PruningModifierBase):
    """Prunes individual weights of Linear and Conv2d layers, to the same density in every
    layer. With ``mask_structure: "2:4"`` it keeps 2 of every 4 consecutive input weights, the
    pattern sparse tensor cores accelerate (Mishra et al., "Accelerating Sparse Deep Neural
    Networks", 2021, arXiv:2104.08378). Weights stay dense tensors with zeros.

    With ``method: snip_momentum`` it prunes as DeepSpeed's ``sparse_pruning`` with that
    method does (Intel Neural Compressor's pruner; the rules: ``snip.py``): each weight's
    SNIP saliency |W * grad| (Lee et al., "SNIP: Single-shot Network Pruning based on
    Connection Sensitivity", 2019, arXiv:1810.02340) is kept as a momentum (0.9) over the
    optimizer steps from the first one and averaged over ``block_pattern`` blocks; at steps
    ``start``, ``start + update``, ... up to ``end`` one threshold over the blocks of all
    layers prunes the model to ``1 - density ** (k / K)`` of its blocks at the k-th of K
    steps after the first (no layer past 98% of its blocks). Masks are recomputed from the
    scores each time, so a pruned block may come back. Only the pruned weights are zeroed
    (after every optimizer step), not their gradients.

    **Lifecycle** (see ``PruningModifierBase``): masks are recomputed on the schedule, held
    through training (weights and gradients masked, re-zeroed after every optimizer step) and
    left in the weights at finalize. ``snip_momentum`` scores every optimizer step (on
    OPTIM_PRE_STEP) and prunes at the BATCH_START of its pruning steps.

    .. code-block:: yaml

        sparse_stage:
          sparse_modifiers:
            SparsePruningModifier:
              method: snip_momentum
              density: 0.2
              block_pattern: 4x1
              start: 1000
              end: 51000
              update: 1000
              ignore: ["re:.*classifier", "re:.*pooler"]

    :param mask_structure: ``unstructured`` or ``N:M``: *keep* N of every M (the density is
        N/M; giving ``density`` is optional, and it must equal N/M) and there is no ramp.
        llm-compressor's SparseGPT and Wanda (ours too, under their names) read ``N:M`` the
        other way, pruning N; the two agree at 2:4
    :param targets: default: every Linear and Conv2d except the output embeddings
    :param layers_only: prune only the Linear and Conv2d modules among those ``targets``
        match, skipping (and logging) the others, as DeepSpeed matches its ``modules`` keys
        against compressible layers only; by default a target that matches another module
        is an error
    :param block_pattern: ``snip_momentum`` only: the block one score covers, ``NxM`` rows
        (outputs) by columns (inputs) of the weight, ``channelxM`` or ``Nxchannel`` for a
        whole dimension; default ``4x1``. With ``snip_momentum``, unset ``targets`` means
        DeepSpeed's choice: every module whose class name contains ``Linear`` or ``Conv``,
        except a plain Linear/Conv2d that is the model's last module (its head); ``update``
        (default 1) counts from ``start``, and ``end`` (default ``start``) is the last
        pruning step
    """

    mask_structure: str = "unstructured"
    layers_only: bool = False
    block_pattern: str | None = None

    supports_snip_momentum: ClassVar[bool] = True

    @field_validator("mask_structure")
    @classmethod
    def _valid_structure(cls, value: str) -> str:
        parse_mask_structure(value)
        return value

    @field_validator("block_pattern")
    @classmethod
    def _valid_block_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            parse_block_pattern(value)
        return value

    @model_validator(mode="after")
    def _snip_fields(self) -> SparsePruningModifier:
        if self.method != "snip_momentum":
            if self.block_pattern is not None:
                raise ValueError(
                    f"block_pattern ({self.block_pattern!r}) is read only with method "
                    f"'snip_momentum', not {self.method!r}"
                )
            return self
        given = sorted({"init_density", "ramp"} & self.model_fields_set)
        if given:
            raise ValueError(
                f"method 'snip_momentum' follows its own exponential schedule; remove {given}"
            )
        if self.mask_structure != "unstructured":
            raise ValueError(
                f"method 'snip_momentum' prunes blocks (block_pattern), not mask_structure "
                f"{self.mask_structure!r}"
            )
        if self.density is None:
            raise ValueError("method 'snip_momentum' needs density (the fraction kept)")
        if self.start is None or self.start != int(self.start):
            raise ValueError(
                f"method 'snip_momentum' prunes during training from optimizer step start; "
                f"give start as a whole number of steps (got {self.start})"
            )
        for name in ("end", "update"):
            value = getattr(self, name)
            if value is not None and value != int(value):
                raise ValueError(
                    f"method 'snip_momentum' counts {name} in whole optimizer steps, got {value}"
                )
        return self

    def final_density(self) -> float | None:
        n_m = parse_mask_structure(self.mask_structure)
        if n_m is None:
            if self.density is None:
                raise ValueError("density (or sparsity) is required for unstructured pruning")
            return self.density
        ratio = n_m[0] / n_m[1]
        if self.density is not None and abs(self.density - ratio) > 1e-9:
            raise ValueError(
                f"density {self.density} contradicts mask_structure {self.mask_structure!r}, "
                f"which keeps {ratio}; leave density unset"
            )
        if "init_density" in self.model_fields_set:
            raise ValueError(
                f"mask_structure {self.mask_structure!r} has no ramp: remove init_density"
            )
        return ratio

    def resolve_couplings(self, model: torch.nn.Module) -> list[Coupling]:
        if self.targets is None and self.method == "snip_momentum":
            named = self._snip_default_layers(model)
        elif self.targets is None:
            out_emb = (
                model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            )
            named = [
                (name, module)
                for name, module in model.named_modules()
                if isinstance(module, _PRUNABLE) and module is not out_emb
            ]
            kept = {n for n, _ in match_named_modules(model, [n for n, _ in named], self.ignore)}
            named = [(n, m) for n, m in named if n in kept]
        else:
            named = list(match_named_modules(model, self.targets, self.ignore))
        if self.layers_only:
            skipped = [n for n, m in named if not isinstance(m, _PRUNABLE)]
            if skipped:
                logger.info(
                    "{}: layers_only: {} matched module(s) that are not Linear or Conv2d are "
                    "not pruned themselves: {}",
                    type(self).__name__,
                    len(skipped),
                    ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""),
                )
            named = [(n, m) for n, m in named if isinstance(m, _PRUNABLE)]
            if not named:
                raise ValueError(
                    f"{type(self).__name__}: targets {self.targets} match no Linear or Conv2d"
                    f"{conv1d_hint(model)}"
                )
        couplings = []
        for name, module in named:
            if not isinstance(module, _PRUNABLE):
                raise ValueError(
                    f"{type(self).__name__}: target {name} is a {type(module).__name__}; only "
                    "Linear and Conv2d weights are pruned (narrow targets or add it to ignore)"
                    f"{conv1d_hint(model)}"
                )
            couplings.append(Coupling(name=name, members=[Member(name, module, None)]))
        return couplings

    def _snip_default_layers(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """DeepSpeed's ``snip_momentum`` layers (``snip_layers``), less ``ignore``."""
        found, head = snip_layers(model)
        if head is not None:
            logger.info(
                "{}: snip_momentum leaves out the model's last layer {} (its head), and any "
                "layer whose name {!r} finds as a regular expression, as DeepSpeed does",
                type(self).__name__,
                head,
                head,
            )
        return [(n, m) for n, m in found if not is_match(n, m, self.ignore)]

    def select(self, coupling: Coupling, scores: torch.Tensor, density: float) -> torch.Tensor:
        n_m = parse_mask_structure(self.mask_structure)
        if n_m is None:
            return super().select(coupling, scores, density)
        try:
            return nm_mask(scores, *n_m)
        except ValueError as err:
            raise ValueError(f"{coupling.name}: {err}") from None

    def score_mask_for(self, coupling: Coupling, scores: torch.nn.Parameter, dim: int | None):
        return ScoreMask(scores, dim, parse_mask_structure(self.mask_structure))

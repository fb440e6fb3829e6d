"""SparseGPTModifier: one-shot pruning with the inverse Hessian, one decoder layer at a time."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator

from compressor.core.events import Event
from compressor.core.state import State
from compressor.modifiers.base import CalibrationTraits, Modifier
from compressor.modifiers.pruning.oneshot import (
    OneShotSparsityModifier,
    write_pruned_weight,
)
from compressor.modifiers.pruning.sparsegpt.sparsegpt import sparsegpt_prune
from compressor.modifiers.quantization.gptq.hessian import SharedHessians
from compressor.modifiers.quantization.gptq.ranks import reduce_hessians
from compressor.utils import distributed

__all__ = ["SparseGPTModifier"]


@Modifier.register("SparseGPT")
class SparseGPTModifier(OneShotSparsityModifier):
    """Prune Linear weights in one shot with SparseGPT: masks chosen with the inverse Hessian
    of each Linear's inputs, the weights kept updated to compensate.

    SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be
    Accurately Pruned in One-Shot") collects the Hessian ``2/n sum x x^T`` of every targeted
    Linear's inputs, as GPTQ does (the same ``SharedHessians``), and prunes the weight column
    by column, block by block (``sparsegpt.py``). On the sequential pipeline each decoder
    layer is calibrated on the outputs of the already pruned layers before it, every Linear
    of the layer on the layer's own inputs, as the paper does: not in GPTQ's stages (o on
    the pruned q/k/v, down on the pruned gate/up), whose Hessians would fit each Linear's
    compensation to inputs its pruned neighbours already distort, while its target stays
    its own dense output on those inputs (worse perplexity, ``docs/pruning.md``). With a
    GPTQ in the same run that calibrates in stages (``true_sequential``), SparseGPT takes
    them too: GPTQ's Hessians must come from the pruned Linears before it, or it
    compensates for inputs the pruned layer never gives. The fields are
    llm-compressor's, so its recipes run unchanged; the zeros stay in the dense weights (and
    a later ``GPTQModifier`` keeps them).

    **Lifecycle**

    - ``on_initialize``: unfold fused mixture-of-experts weights into one Linear per expert
      (routers stay dense); match the targets to Linears and their sparsities (errors name
      the module: not a Linear, N:M that does not fit, a sparsity list of the wrong length)
    - ``on_start`` (calibration start): with ``sparsity_profile: owl``, one dense pass of
      the calibration batches for the layer sparsities; a Hessian-accumulating forward pre-hook on each
      Linear; every token runs through every expert (``calibrate_all_experts``)
    - ``on_update`` at SEQUENTIAL_EPOCH_END: prune the Linears the event carries and free
      their Hessians
    - ``on_end`` (calibration end): prune whatever is still pending; a Linear that saw no data
      is pruned by magnitude, with a warning naming it
    - ``finalize``: hooks removed; the pruned weights stay zero

    Under a process group each rank calibrates on its share of the rows: the Hessians are
    reduced over the ranks (``reduce_hessians``, shared with GPTQ) and each Linear is pruned by
    one rank, its weight broadcast to the others (docs/distributed.md).

    .. code-block:: yaml

        sparsity_stage:
          sparsity_modifiers:
            SparseGPTModifier:
              sparsity: 0.5
              mask_structure: "2:4"
              targets: ["re:model.layers.\\\\d+$"]
              ignore: ["re:.*lm_head"]

    :param block_size: columns per mask-selection and lazy-update block (128 in the paper);
        with N:M a multiple of M
    :param dampening_frac: fraction of the mean Hessian diagonal added to the diagonal before
        inversion (raised, with a warning, when the Hessian is not positive definite)
    :param preserve_sparsity_mask: the zeros a weight already has (an earlier pruning
        stage's) stay pruned and count towards the sparsity, as in llm-compressor: SparseGPT
        extends that mask instead of choosing a new one. Unstructured, a weight already sparser
        than its target is refused at pruning, naming it
    :param offload_hessians: llm-compressor's option to keep Hessians in CPU memory; not
        supported (refused when true)
    (and the fields of ``OneShotSparsityModifier``: ``sparsity``, ``mask_structure``,
    ``targets``, ``ignore``, ...)
    """

    block_size: int = Field(default=128, ge=1)
    dampening_frac: float = Field(default=0.01, ge=0.0)
    preserve_sparsity_mask: bool = False
    offload_hessians: bool = False

    _hessians: SharedHessians = PrivateAttr(default_factory=SharedHessians)

    @model_validator(mode="after")
    def _check_sparsegpt(self) -> SparseGPTModifier:
        n_m = self.n_m()
        if n_m is not None and self.block_size % n_m[1]:
            raise ValueError(
                f"block_size={self.block_size} must be a multiple of M={n_m[1]} "
                f"(mask_structure {self.mask_structure!r}), so no group straddles two blocks"
            )
        if self.offload_hessians:
            raise ValueError(
                "offload_hessians=True is not supported: Hessians live with their layer; "
                "leave it false"
            )
        return self

    # ---------------------------------------------------------------- lifecycle
    def calibration_traits(self) -> CalibrationTraits:
        # the paper's order (every Linear of a layer calibrated on the layer's inputs), unless
        # a modifier of the run (GPTQ) needs stages
        return replace(super().calibration_traits(), in_stages=False, accepts_stages=True)

    def on_start(self, state: State, event: Event) -> None:
        self.choose_owl_sparsities(state, event)
        for name, target in self._modules.items():
            self.register_hook(target.module, self._hessian_hook(name), "forward_pre")
        self.start_expert_coverage(state)

    def _hessian_hook(self, name: str) -> Any:
        hessians = self._hessians

        def hook(module: torch.nn.Module, inputs: tuple) -> None:
            hessians.observe(name, inputs[0])

        return hook

    def on_update(self, state: State, event: Event) -> None:
        targets = self.calibrated_targets(event)
        self._prune_calibrated(reduce_hessians(self._hessians, targets, self._linears()))

    def on_end(self, state: State, event: Event) -> None:
        self.end_expert_coverage()
        pending = [name for name in self._modules if name not in self._pruned]
        calibrated = reduce_hessians(self._hessians, pending, self._linears())
        self._prune_calibrated(calibrated)
        for name, target in self._modules.items():
            if name not in self._pruned:
                logger.warning(
                    "SparseGPTModifier: {} received no calibration data; pruning it by magnitude",
                    name,
                )
                module = target.module
                identity = torch.eye(module.in_features, device=module.weight.device)
                self._write(name, self._solve(name, identity, 0))
        self.remove_hooks()
        self._hessians.clear()

    # ---------------------------------------------------------------- pruning
    def _linears(self) -> dict[str, torch.nn.Module]:
        return {name: target.module for name, target in self._modules.items()}

    def _prune_calibrated(self, calibrated: list[str]) -> None:
        """Prune ``calibrated``, whose Hessians ``reduce_hessians`` has made those over every
        rank's data (under a process group; the names come from the model, alike on every
        rank): each Linear pruned by one rank (shared out by cost), its weight broadcast to the
        others."""
        weights = [self._modules[name].module.weight for name in calibrated]
        owners = distributed.assign_by_cost([float(w.shape[0]) * w.shape[1] ** 2 for w in weights])
        results: list[torch.Tensor] = []
        for name, weight, owner in zip(calibrated, weights, owners, strict=True):
            hessian, count = self._hessians.pop([name])
            if owner == distributed.rank():
                solved = self._solve(name, hessian, count)
                self._write(name, solved)
                # kept for the broadcast only (in one process, freed at once as before)
                results.append(solved if distributed.is_distributed() else weight.data[:0])
            else:  # solved by its owner, received below
                results.append(torch.empty_like(weight.data))
            del hessian
        distributed.broadcast_parts(zip(results, owners, strict=True))
        for name, result, owner in zip(calibrated, results, owners, strict=True):
            if owner != distributed.rank():
                self._write(name, result)

    def _solve(self, name: str, hessian: torch.Tensor, count: int) -> torch.Tensor:
        module, sparsity = self._modules[name].module, self._modules[name].sparsity
        try:
            result = sparsegpt_prune(
                module.weight.data,
                hessian,
                sparsity,
                mask_structure=self.n_m(),
                block_size=self.block_size,
                dampening_frac=self.dampening_frac,
                overwrite_hessian=True,  # popped: its own, or a copy
                keep_zeros=self.preserve_sparsity_mask,
            )
        except ValueError as error:
            raise ValueError(f"SparseGPTModifier, {name}: {error}") from error
        logger.debug(
            "SparseGPT {}: {} samples, sparsity {:.3f}, error {:.4g}",
            name,
            count,
            float(result.mask.float().mean()),
            result.loss,
        )
        return result.weight.to(module.weight.dtype).contiguous()

    def _write(self, name: str, weight: torch.Tensor) -> None:
        write_pruned_weight(self._modules[name].module, weight)
        self._pruned.add(name)

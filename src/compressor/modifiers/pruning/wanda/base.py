"""WandaPruningModifier: one-shot pruning by |W| times input norms, per output row."""

from __future__ import annotations

from typing import Any

import torch
from loguru import logger
from pydantic import PrivateAttr

from compressor.core.events import Event
from compressor.core.state import State
from compressor.modifiers.base import Modifier
from compressor.modifiers.pruning.oneshot import (
    OneShotSparsityModifier,
    write_pruned_weight,
)
from compressor.modifiers.pruning.wanda.wanda import accumulate_square_sums, wanda_mask
from compressor.utils import distributed

__all__ = ["WandaPruningModifier"]


@Modifier.register("Wanda")
class WandaPruningModifier(OneShotSparsityModifier):
    """Prune Linear weights in one shot with Wanda: the weights of least ``|W_ij| *
    ||X_j||_2`` in each output row (Sun et al., 2024, "A Simple and Effective Pruning
    Approach for Large Language Models"; ``wanda.py``). Nothing is updated to compensate.

    The fields are llm-compressor's, so its recipes run unchanged. On the sequential pipeline
    each decoder layer's norms come from the outputs of the already pruned layers before it,
    and on Llama-style layers each group of Linears (q/k/v, o, gate/up, down) from the outputs
    of those already pruned. (``SparsePruningModifier`` with ``method: activation`` scores
    the same way but compares the scores across the whole layer, not per row.)

    **Lifecycle**

    - ``on_initialize``: unfold fused mixture-of-experts weights into one Linear per expert
      (routers stay dense); match the targets to Linears and their sparsities (errors name
      the module)
    - ``on_start`` (calibration start): with ``sparsity_profile: owl``, one dense pass of
      the calibration batches for the layer sparsities; a forward pre-hook on each Linear
      summing its inputs' squares per feature; every token runs through every expert (``calibrate_all_experts``)
    - ``on_update`` at SEQUENTIAL_EPOCH_END: prune the Linears the event carries
    - ``on_end`` (calibration end): prune whatever is still pending; a Linear that saw no data
      is pruned by magnitude per row, with a warning naming it
    - ``finalize``: hooks removed; the pruned weights stay zero

    Under a process group each rank calibrates on its share of the rows; the square sums are
    added over the ranks before a Linear is pruned (docs/distributed.md).

    .. code-block:: yaml

        sparsity_stage:
          sparsity_modifiers:
            WandaPruningModifier:
              sparsity: 0.5
              mask_structure: "0:0"
              ignore: ["re:.*lm_head"]

    (the fields of ``OneShotSparsityModifier``: ``sparsity``, ``mask_structure``,
    ``targets``, ``ignore``, ...)
    """

    _sums: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)

    def on_start(self, state: State, event: Event) -> None:
        self.choose_owl_sparsities(state, event)
        for name, target in self._modules.items():
            self.register_hook(target.module, self._norm_hook(name), "forward_pre")
        self.start_expert_coverage(state)

    def _norm_hook(self, name: str) -> Any:
        sums = self._sums

        def hook(module: torch.nn.Module, inputs: tuple) -> None:
            sums[name] = accumulate_square_sums(inputs[0], sums.get(name))

        return hook

    def on_update(self, state: State, event: Event) -> None:
        for name in self._reduce(self.calibrated_targets(event)):
            self._prune(name, self._sums.pop(name))

    def on_end(self, state: State, event: Event) -> None:
        self.end_expert_coverage()
        self._reduce([name for name in self._modules if name not in self._pruned])
        for name, target in self._modules.items():
            module = target.module
            if name in self._pruned:
                continue
            sums = self._sums.pop(name, None)
            if sums is None:
                logger.warning(
                    "WandaPruningModifier: {} received no calibration data; pruning it by "
                    "magnitude",
                    name,
                )
                sums = torch.ones(module.in_features, device=module.weight.device)
            self._prune(name, sums)
        self.remove_hooks()
        self._sums.clear()

    def _reduce(self, names: list[str]) -> list[str]:
        """Those of ``names`` with input statistics: under a process group, the sums over
        every rank's data (``names`` come from the model, alike on every rank)."""
        if not distributed.is_distributed():
            return [name for name in names if name in self._sums]
        calibrated = []
        for name in names:
            module = self._modules[name].module
            total = distributed.reduce_optional(
                self._sums.get(name), (module.in_features,), "sum", device=module.weight.device
            )
            if total is not None:
                self._sums[name] = total
                calibrated.append(name)
        return calibrated

    def _prune(self, name: str, sums: torch.Tensor) -> None:
        module, sparsity = self._modules[name].module, self._modules[name].sparsity
        mask = wanda_mask(module.weight.data, sums, sparsity, self.n_m())
        weight = module.weight.data.masked_fill(mask, 0.0)
        logger.debug("Wanda {}: sparsity {:.3f}", name, float(mask.float().mean()))
        write_pruned_weight(module, weight)
        self._pruned.add(name)

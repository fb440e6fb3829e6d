"""Quantization-aware training of weights FSDP2 (``fully_shard``) manages.

Outside a forward such a weight is FSDP2's sharded DTensor, each rank holding a slice of
rows; just before the forward of the module ``fully_shard`` was applied to, FSDP2 gathers the
whole weight and sets it on the module, and puts the sharded one back after. A
``torch.nn.utils.parametrize`` parametrization would compute from the sharded parameter
underneath and never see the gathered one, so here the fake quantization runs for the length
of each of the module's own forwards on the whole weight FSDP2 set: a forward pre-hook swaps
the fake-quantized weight in (``module.weight`` is then what a parametrization would return)
and a forward hook puts FSDP2's weight back before FSDP2's own post-forward reshards it. Every
scale is therefore computed from the whole weight, exactly as in one process (per tensor, per
channel, groups, blocks, ternary / binary alike: no reduction over the ranks), and the
straight-through gradient reaches the gathered weight, which FSDP2 reduce-scatters into the
sharded one's gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

__all__ = ["QuantizeOnForward"]


class QuantizeOnForward:
    """Fake-quantizes ``module.<name>`` for the length of each forward of ``module``, on the
    whole tensor FSDP2 gathered; ``remove`` detaches it. The hooks are torch's own, not a
    modifier's, so that, like a parametrization, they apply while other modifiers' hooks
    are paused.

    :param module: a module whose parameters FSDP2 manages
    :param quantize: the fake quantizer (a ``WeightFakeQuantizer``)
    :param where: the module's name, for errors
    :param name: the parameter
    """

    def __init__(
        self,
        module: torch.nn.Module,
        quantize: torch.nn.Module,
        where: str,
        name: str = "weight",
    ) -> None:
        self.module, self.quantize, self.where, self.name = module, quantize, where, name
        self._held: Any = None
        self._handles = [
            module.register_forward_pre_hook(self._swap_in),
            # prepend: before FSDP2's post-forward (when fully_shard was applied to this very
            # module), which reshards what it finds on the module
            module.register_forward_hook(self._swap_back, prepend=True, always_call=True),
        ]

    def _swap_in(self, module: torch.nn.Module, _inputs: tuple) -> None:
        weight = module._parameters[self.name]
        if isinstance(weight, DTensor):
            raise RuntimeError(
                f"{self.where}: its {self.name} is still FSDP2's sharded parameter in its "
                "forward; quantization-aware training under fully_shard needs the module to "
                "run inside the forward of the module fully_shard was applied to (which "
                "gathers it)"
            )
        self._held = weight
        module._parameters[self.name] = self.quantize(weight)

    def _swap_back(self, module: torch.nn.Module, _inputs: tuple, _output: Any) -> None:
        if self._held is not None:
            module._parameters[self.name] = self._held
            self._held = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

"""Smoothing the input of a sparse mixture-of-experts block: every reader balanced, the
routing exact.

The output of the norm before a sparse block is read by every routed expert's gate and up
projections, by the shared experts' and by the router (and Qwen's shared-expert gate). A scale
that divides it must multiply the input columns of every one of them, or the block computes
another function: the router above all, since a router reading a divided input computes other
logits and sends tokens to other experts. ``BlockReaders`` knows, per sparse block, the
Linears and the routing modules that read its input; ``BlockReaders.split`` takes a mapping's
matched balance layers, takes the routing modules out of them (their weights are scaled with
the others but never searched nor quantized: they stay in full precision), adds those of every
block the mapping reaches, and refuses a mapping that balances only part of a block's readers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from compressor.architectures.moe import find_moe_blocks
from compressor.modifiers.moe import ExpertMLP, LinearExperts

__all__ = ["BlockReaders", "routed_only"]


@dataclass
class _Block:
    linears: dict[int, str] = field(default_factory=dict)
    routing: dict[int, tuple[str, torch.nn.Module]] = field(default_factory=dict)


class BlockReaders:
    """The modules reading each sparse block's input, for the smoothing mappings.

    :param model: the model, its experts unfolded (``LinearExperts``); a block whose experts
        stayed fused (an ``ignore`` kept them) is known too, so that smoothing its input is
        refused rather than done to some of its readers only
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._blocks: dict[str, _Block] = {}
        self._fused: dict[int, str] = {}  # id of a reader of a fused block's input -> experts
        self._owner_of: dict[int, str] = {}
        for name, module in model.named_modules():
            if not isinstance(module, LinearExperts):
                continue
            block_name = name.rpartition(".")[0]
            block = self._blocks.setdefault(block_name, _Block())
            for index, expert in enumerate(module):
                assert isinstance(expert, ExpertMLP)
                gate, up, _ = expert.projections()
                gate_name, up_name, _ = expert.names
                block.linears[id(gate)] = f"{name}.{index}.{gate_name}"
                block.linears[id(up)] = f"{name}.{index}.{up_name}"
            parent = model.get_submodule(block_name)
            self._add_shared(parent, block_name, module.layout.shared_experts, block)
            for attribute in module.layout.exact_modules:
                routing = getattr(parent, attribute, None)
                if isinstance(routing, torch.nn.Module):
                    block.routing[id(routing)] = (f"{block_name}.{attribute}", routing)
        for moe in find_moe_blocks(model):
            if moe.name in self._blocks:
                continue
            parent = model.get_submodule(moe.name)
            stray = _Block()
            self._add_shared(parent, moe.name, moe.layout.shared_experts, stray)
            for attribute in moe.layout.exact_modules:
                routing = getattr(parent, attribute, None)
                if isinstance(routing, torch.nn.Module):
                    stray.routing[id(routing)] = (f"{moe.name}.{attribute}", routing)
            for key in [*stray.linears, *stray.routing]:
                self._fused[key] = moe.experts
        for block_name, block in self._blocks.items():
            for key in [*block.linears, *block.routing]:
                self._owner_of[key] = block_name

    @staticmethod
    def _add_shared(
        parent: torch.nn.Module, block_name: str, attribute: str | None, block: _Block
    ) -> None:
        """The shared experts' gate and up projections (a Llama-style MLP)."""
        shared = getattr(parent, attribute, None) if attribute else None
        for projection in ("gate_proj", "up_proj"):
            linear = getattr(shared, projection, None)
            if isinstance(linear, torch.nn.Linear):
                block.linears[id(linear)] = f"{block_name}.{attribute}.{projection}"

    def split(
        self, names: Sequence[str], modules: Sequence[torch.nn.Module], describe: str
    ) -> tuple[list[str], list[torch.nn.Module], list[str], list[torch.nn.Module]]:
        """A mapping's matched balance layers as (balance names, balances, routing names,
        routing modules): the routers and shared-expert gates of every sparse block the
        mapping reaches join the routing modules (also when the mapping names them itself).

        :param describe: the mapping, for errors
        :raises ValueError: the mapping balances some of a block's input readers but not all
            (naming the ones left out), or reaches a block whose experts stayed fused
        """
        for module in modules:
            experts = self._fused.get(id(module))
            if experts is not None:
                raise ValueError(
                    f"mapping {describe} smooths the input of a sparse block whose experts "
                    f"{experts} stayed fused (an ignore keeps them in full precision), so "
                    "they would read the divided input unbalanced; leave the experts out of "
                    "ignore, or keep this mapping's smooth layer unsmoothed (ignore it in the "
                    "smoothing modifier)"
                )
        reached = {self._owner_of[id(m)] for m in modules if id(m) in self._owner_of}
        balance_names, balances, routing_names, routing = [], [], [], []
        for name, module in zip(names, modules, strict=True):
            if any(id(module) in self._blocks[b].routing for b in reached):
                continue
            balance_names.append(name)
            balances.append(module)
        present = {id(m) for m in modules}
        for block_name in sorted(reached):
            block = self._blocks[block_name]
            missing = [name for key, name in block.linears.items() if key not in present]
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                shown = ", ".join(missing[:3]) + more
                raise ValueError(
                    f"mapping {describe} balances part of what reads the input of the sparse "
                    f"block {block_name}: {shown} also read it, and a scale dividing it must "
                    "multiply every reader's columns; add them to balance_layers (every "
                    "expert's and shared expert's gate and up projections)"
                )
            for name, module in block.routing.values():
                routing_names.append(name)
                routing.append(module)
        return balance_names, balances, routing_names, routing


@contextlib.contextmanager
def routed_only(root: torch.nn.Module) -> Iterator[None]:
    """Inside the block, the ``LinearExperts`` under ``root`` run each expert on its routed
    tokens only (all-expert calibration paused): the same output for ``top-k / experts`` of
    the work, for searches that only compare outputs."""
    experts = [m for m in root.modules() if isinstance(m, LinearExperts)]
    saved = [m.all_experts_requests for m in experts]
    for module in experts:
        module.all_experts_requests = 0
    try:
        yield
    finally:
        for module, requests in zip(experts, saved, strict=True):
            module.all_experts_requests = requests

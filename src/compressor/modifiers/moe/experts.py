"""Fused experts as one Linear per expert and projection, and back.

transformers 5 holds a sparse block's experts as fused 3-D parameters; compressed-tensors
quantizes, calibrates and saves Linears. ``LinearExperts`` holds the same experts as
Linears named as the family's Hub checkpoint names them (``experts.3.gate_proj``,
Mixtral's ``experts.3.w1``), computes exactly what the fused module computes, and is what
a model compressed by this library keeps: its state dict is the per-expert layout that
transformers (and vLLM) load a compressed-tensors checkpoint from. ``fold_experts`` puts a
model back into the fused layout (dense weights, for a model that is not quantized).

The weight split is pure (``weights.py``), tested on its own; ``prepare.py`` is what a
modifier calls on initialize.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from compressed_tensors.offload import get_cache_init_kwargs, offload_module
from compressed_tensors.offload.cache import OffloadCache

from compressor.architectures.moe import MoELayout
from compressor.modifiers.moe.weights import ExpertMatrices, expert_matrices, fused_matrices

__all__ = ["ExpertMLP", "LinearExperts", "fold_experts", "unfold_experts"]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    out_features, in_features = weight.shape
    linear = torch.nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class ExpertMLP(torch.nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its Linears under the checkpoint's names.

    :param names: the (gate, up, down) attribute names (``gate_proj``, ``up_proj``,
        ``down_proj``; Mixtral's ``w1``, ``w3``, ``w2``)
    :param matrices: the expert's weights
    :param act_fn: the activation of the gate (the fused module's ``act_fn``)
    """

    def __init__(
        self, names: tuple[str, str, str], matrices: ExpertMatrices, act_fn: torch.nn.Module
    ) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, _linear(matrices.gate, matrices.gate_bias))
        self.add_module(up, _linear(matrices.up, matrices.up_bias))
        self.add_module(down, _linear(matrices.down, matrices.down_bias))
        self.act_fn = act_fn

    def projections(self) -> tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Linear]:
        """The gate, up and down Linears."""
        gate, up, down = (getattr(self, n) for n in self.names)
        return gate, up, down

    def matrices(self) -> ExpertMatrices:
        gate, up, down = self.projections()
        return ExpertMatrices(
            gate.weight.data,
            up.weight.data,
            down.weight.data,
            None if gate.bias is None else gate.bias.data,
            None if up.bias is None else up.bias.data,
            None if down.bias is None else down.bias.data,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.projections()
        return down(self.act_fn(gate(hidden_states)) * up(hidden_states))


class LinearExperts(torch.nn.ModuleList):
    """A sparse block's routed experts as a list of ``ExpertMLP``, called as the fused
    module is: ``experts(hidden_states [tokens, hidden], top_k_index, top_k_weights)``.

    Each token's output is the routing-weighted sum of its top-k experts' outputs, as in the
    fused module. While ``all_experts_requests`` is positive (all-expert calibration, see
    ``coverage.py``), every expert also runs on every token, so the hooks on its Linears see
    all of them, and the output still sums only the routed experts.

    :param experts: the experts, in index order
    :param layout: the family's layout (kept to fold back)
    :param fused_template: the fused module with its parameters on the meta device (kept to
        fold back)
    """

    holds_linear_experts = True

    def __init__(
        self,
        experts: list[ExpertMLP],
        layout: MoELayout,
        fused_template: torch.nn.Module,
    ) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        self.layout = layout
        # a tuple, so the template is not a submodule (no state dict entry, no hooks)
        self._fused_template = (fused_template,)
        self.all_experts_requests = 0

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        every_token = self.all_experts_requests > 0
        for index, expert in enumerate(self):
            # (position in the top-k, token), ordered as the fused module orders them
            top_k_pos, token_idx = torch.where((top_k_index == index).T)
            if every_token:
                routed = expert(hidden_states)[token_idx]
            elif token_idx.numel() == 0:
                continue
            else:
                routed = expert(hidden_states[token_idx])
            routed = routed * top_k_weights[token_idx, top_k_pos, None]
            output.index_add_(0, token_idx, routed.to(output.dtype))
        return output


def _is_default_gate(module: torch.nn.Module) -> bool:
    """Whether the fused module gates as ``act_fn(gate) * up`` (what ``ExpertMLP`` does)."""
    own = getattr(type(module), "_apply_gate", None)
    return hasattr(module, "act_fn") and (own is None or own.__name__ == "_default_apply_gate")


def unfold_experts(experts: torch.nn.Module, layout: MoELayout, name: str) -> LinearExperts:
    """The ``LinearExperts`` computing what the fused ``experts`` module computes.

    :param experts: a fused experts module of ``layout``'s family
    :param layout: its layout
    :param name: its dotted name, for errors
    :raises ValueError: the family has no per-expert checkpoint layout, or gates otherwise
        than ``act_fn(gate) * up``
    """
    shape = layout.experts
    if shape.checkpoint_names is None:
        raise ValueError(
            f"{name} ({type(experts).__name__}): {layout.family} checkpoints store the fused "
            "expert tensors, with no per-expert layout that transformers or vLLM reload "
            f"quantized experts from; add {name!r} (or 're:.*experts.*') to ignore to keep "
            "them in full precision"
        )
    if not _is_default_gate(experts):
        raise ValueError(
            f"{name} ({type(experts).__name__}) gates its experts with its own _apply_gate, "
            "which the per-expert Linears cannot reproduce; add it to ignore"
        )
    gate_up, down = getattr(experts, shape.gate_up), getattr(experts, shape.down)
    biases = (
        (getattr(experts, f"{shape.gate_up}_bias"), getattr(experts, f"{shape.down}_bias"))
        if shape.bias
        else (None, None)
    )
    act_fn = experts.act_fn
    assert isinstance(act_fn, torch.nn.Module)
    with torch.no_grad():
        modules = [
            ExpertMLP(
                shape.checkpoint_names,
                expert_matrices(shape, gate_up.data, down.data, i, *biases),
                act_fn,
            )
            for i in range(gate_up.shape[0])
        ]
    if isinstance(experts._parameters, OffloadCache):
        # the experts of a layer offloaded (to disk) stay offloaded, one Linear at a time
        cache = get_cache_init_kwargs(experts)
        for module in modules:
            for linear in module.projections():
                offload_module(linear, **cache)
    template = copy.copy(experts)
    template._parameters = {
        key: torch.nn.Parameter(
            torch.empty(value.shape, dtype=value.dtype, device="meta"), value.requires_grad
        )
        for key, value in experts._parameters.items()
        if value is not None
    }
    template._modules = dict(experts._modules)
    return LinearExperts(modules, layout, template)


def fold_experts(model: torch.nn.Module) -> list[str]:
    """Put every ``LinearExperts`` of ``model`` back into its family's fused module, with
    the experts' current (dense) weights.

    :return: the dotted names of the experts modules folded
    :raises ValueError: an expert Linear is quantized (its scales would be lost)
    """
    folded = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LinearExperts):
            continue
        quantized = [
            f"{name}.{n}" for n, m in module.named_modules() if hasattr(m, "quantization_scheme")
        ]
        if quantized:
            raise ValueError(
                f"cannot fold {name} back into fused experts: {quantized[0]} is quantized "
                "(its scales would be lost); save it as it is"
            )
        shape = module.layout.experts
        fused = copy.copy(module._fused_template[0])
        tensors = fused_matrices(shape, [cast(ExpertMLP, e).matrices() for e in module])
        names = (shape.gate_up, shape.down, f"{shape.gate_up}_bias", f"{shape.down}_bias")
        parameters = dict(fused._parameters)
        for key, value in zip(names, tensors, strict=True):
            if value is not None:
                template = parameters[key]
                assert template is not None
                parameters[key] = torch.nn.Parameter(value, template.requires_grad)
        fused._parameters = parameters
        if hasattr(fused, "num_experts"):
            fused.__dict__["num_experts"] = len(module)  # a plain attribute
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, fused)
        folded.append(name)
    return folded

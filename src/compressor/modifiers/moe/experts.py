"""Fused experts as one Linear per expert and projection, and back.

transformers 5 holds a sparse block's experts as fused 3-D parameters; compressed-tensors
quantizes, calibrates and saves Linears. ``LinearExperts`` holds the same experts as
Linears named as the family's Hub checkpoint names them (``experts.3.gate_proj``,
Mixtral's ``experts.3.w1``), computes exactly what the fused module computes, and is what
a model compressed by this library keeps: its state dict is the per-expert layout that
transformers (and vLLM) load a compressed-tensors checkpoint from. ``fold_experts`` puts a
model back into the fused layout (dense weights, for a model that is not quantized).

The weight split is pure (``expert_matrices``, ``fused_matrices``), tested on its own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, cast

import torch
from compressed_tensors.offload import get_cache_init_kwargs, offload_module
from compressed_tensors.offload.cache import OffloadCache
from compressed_tensors.utils.match import is_match
from loguru import logger

from compressor.architectures.moe import (
    ExpertsLayout,
    MoELayout,
    check_expert_modules,
    moe_layout_for_experts,
)

__all__ = [
    "ExpertMLP",
    "LinearExperts",
    "PreparedExperts",
    "expert_matrices",
    "fold_experts",
    "fused_matrices",
    "keep_routing_exact",
    "prepare_experts",
    "unfold_experts",
]


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


@dataclass(frozen=True)
class PreparedExperts:
    """What ``prepare_experts`` did to a model.

    :param unfolded: experts modules turned into ``LinearExperts`` now
    :param experts: every ``LinearExperts`` of the model (unfolded now or before)
    :param exact: the routing modules (routers, shared-expert gates) to keep exact
    :param skipped: expert-like modules left alone because ``ignore`` names them
    """

    unfolded: tuple[str, ...]
    experts: tuple[str, ...]
    exact: tuple[str, ...]
    skipped: tuple[str, ...]


def prepare_experts(
    model: torch.nn.Module,
    ignore: list[str],
    owner: str,
    extra_layouts: tuple[MoELayout, ...] = (),
) -> PreparedExperts:
    """Make every expert of ``model`` a Linear a modifier can compress, or refuse.

    Every fused experts module of a known layout is replaced by its ``LinearExperts``
    (unless ``ignore`` matches it, then it is left as it is, logged); an expert-like module
    no layout knows is refused (``check_expert_modules``) unless ``ignore`` matches it
    (skipped, logged). Called again on a prepared model, it changes nothing.

    :param model: the model, changed in place
    :param ignore: the modifier's ignore patterns (names, class names, ``re:``)
    :param owner: the modifier, for logs
    :param extra_layouts: layouts the recipe gives for families the table lacks
    :return: what was done, and the routing modules to keep exact
    """
    ignored = [name for name, module in model.named_modules() if is_match(name, module, ignore)]
    skipped = check_expert_modules(model, skip=ignored, extra_layouts=extra_layouts)
    by_class = {x.experts.experts_class: x for x in extra_layouts}
    unfolded, left = [], []
    for name, module in list(model.named_modules()):
        layout = moe_layout_for_experts(module) or by_class.get(type(module).__name__)
        if layout is None:
            continue
        if name in ignored:
            left.append(name)
            continue
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, unfold_experts(module, layout, name))
        unfolded.append(name)
    exact: list[str] = []
    experts: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, LinearExperts):
            experts.append(name)
            block = name.rpartition(".")[0]
            exact += [f"{block}.{a}" for a in module.layout.exact_modules]
    if unfolded:
        logger.info(
            "{}: {} fused experts module(s) unfolded into one Linear per expert and "
            "projection (the checkpoint's per-expert layout), e.g. {}",
            owner,
            len(unfolded),
            unfolded[0],
        )
    if exact:
        logger.info(
            "{}: the routing stays exact: {} router / shared-expert gate module(s) are not "
            "compressed (a preset ignore), e.g. {}",
            owner,
            len(exact),
            exact[0],
        )
    for name in (*skipped, *left):
        logger.info("{}: experts {} left in full precision (ignore names it)", owner, name)
    return PreparedExperts(tuple(unfolded), tuple(experts), tuple(exact), (*skipped, *left))


def keep_routing_exact(config: Any, exact: tuple[str, ...]) -> Any:
    """``config`` (a compressed-tensors QuantizationConfig) with the routing modules added to
    its ignore list, so routers and shared-expert gates stay in full precision."""
    if not exact:
        return config
    ignore = list(config.ignore or [])
    return config.model_copy(update={"ignore": ignore + [n for n in exact if n not in ignore]})

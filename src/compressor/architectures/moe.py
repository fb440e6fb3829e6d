"""Mixture-of-experts layouts of the transformers 5 families, and finding them in a model.

transformers 5 stores the routed experts of a sparse block as one ``...Experts`` module
holding fused 3-D parameters (``gate_up_proj`` of shape ``[experts, 2 * intermediate,
hidden]`` and ``down_proj`` of shape ``[experts, hidden, intermediate]``, or their
transposes), while the checkpoints on the Hub (and what vLLM loads) name one Linear per
expert and projection (``experts.3.gate_proj.weight``, Mixtral's ``experts.3.w1.weight``).
``MoELayout`` records, per family, where the pieces of a sparse block live and how the
fused tensors split into those per-expert matrices; ``find_moe_blocks`` describes every
sparse block of a model, and ``check_expert_modules`` refuses an expert-like module no
table describes, so that no expert is left uncompressed in silence.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = [
    "MOE_LAYOUTS",
    "UNFOLDED_MARKER",
    "ExpertsLayout",
    "MoEBlock",
    "MoELayout",
    "UnknownExpertsError",
    "check_expert_modules",
    "find_moe_blocks",
    "moe_layout_for_experts",
]

#: the marker attribute of an experts module already in one-Linear-per-expert form (set by
#: the modifiers' unfolded experts class), which the checks here accept as known
UNFOLDED_MARKER = "holds_linear_experts"


@dataclass(frozen=True)
class ExpertsLayout:
    """How one ``...Experts`` module stores its experts' matrices.

    :param experts_class: the class name of the experts module (``Qwen3MoeExperts``)
    :param gate_up: the fused gate-and-up parameter, ``[experts, 2 * intermediate, hidden]``
        (``[experts, hidden, 2 * intermediate]`` when ``transposed``)
    :param down: the down parameter, ``[experts, hidden, intermediate]`` (or transposed)
    :param transposed: the parameters hold ``[in, out]`` matrices (``x @ w``) instead of the
        Linear convention ``[out, in]`` (``x @ w.T``)
    :param interleaved: gate and up rows alternate (gate 0, up 0, gate 1, ...) instead of
        all gate rows followed by all up rows
    :param bias: ``<gate_up>_bias`` and ``<down>_bias`` parameters ``[experts, out]`` exist
    :param checkpoint_names: the per-expert Linear names of the Hub checkpoint, in the
        order (gate, up, down): ``experts.<i>.<name>.weight``; None when the family's
        checkpoints store the fused tensors themselves (no per-expert layout to save to)
    """

    experts_class: str
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    transposed: bool = False
    interleaved: bool = False
    bias: bool = False
    checkpoint_names: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoELayout:
    """The sparse mixture-of-experts block of one family.

    :param family: a short name for logs and errors
    :param model_types: the ``config.model_type`` values
    :param block_class: the class name of the sparse block (router + experts)
    :param experts: the experts module's attribute on the block, and its layout
    :param router: the router's attribute on the block (kept exact: never quantized)
    :param shared_experts: the attribute of the shared (always active) experts MLP, if any;
        it is a plain MLP of Linears, compressed as any MLP
    :param shared_expert_gate: the attribute of the Linear scaling the shared experts'
        output (a router-like gate, kept exact), if any
    :param num_experts_key: the config key holding the number of routed experts
    :param top_k_key: the config key holding the number of experts each token is routed to
    """

    family: str
    model_types: tuple[str, ...]
    block_class: str
    experts: ExpertsLayout
    experts_attribute: str = "experts"
    router: str = "gate"
    shared_experts: str | None = None
    shared_expert_gate: str | None = None
    num_experts_key: str = "num_experts"
    top_k_key: str = "num_experts_per_tok"

    @property
    def exact_modules(self) -> tuple[str, ...]:
        """The block's attributes that stay in full precision by default (the routing)."""
        return tuple(a for a in (self.router, self.shared_expert_gate) if a is not None)


MOE_LAYOUTS: tuple[MoELayout, ...] = (
    MoELayout(
        family="mixtral",
        model_types=("mixtral", "minimax"),
        block_class="MixtralSparseMoeBlock",
        experts=ExpertsLayout("MixtralExperts", checkpoint_names=("w1", "w3", "w2")),
        num_experts_key="num_local_experts",
    ),
    MoELayout(
        family="qwen2_moe",
        model_types=("qwen2_moe",),
        block_class="Qwen2MoeSparseMoeBlock",
        experts=ExpertsLayout("Qwen2MoeExperts"),
        shared_experts="shared_expert",
        shared_expert_gate="shared_expert_gate",
    ),
    MoELayout(
        family="qwen3_moe",
        model_types=("qwen3_moe",),
        block_class="Qwen3MoeSparseMoeBlock",
        experts=ExpertsLayout("Qwen3MoeExperts"),
    ),
    MoELayout(
        family="qwen3_next",
        model_types=("qwen3_next",),
        block_class="Qwen3NextSparseMoeBlock",
        experts=ExpertsLayout("Qwen3NextExperts"),
        shared_experts="shared_expert",
        shared_expert_gate="shared_expert_gate",
    ),
    MoELayout(
        family="olmoe",
        model_types=("olmoe",),
        block_class="OlmoeSparseMoeBlock",
        experts=ExpertsLayout("OlmoeExperts"),
    ),
    MoELayout(
        family="deepseek_v3",
        model_types=("deepseek_v3",),
        block_class="DeepseekV3MoE",
        experts=ExpertsLayout("DeepseekV3Experts"),
        shared_experts="shared_experts",
        num_experts_key="n_routed_experts",
    ),
    MoELayout(
        family="gpt_oss",
        model_types=("gpt_oss",),
        block_class="GptOssMLP",
        # the Hub checkpoints store these fused tensors as they are (MXFP4): there is no
        # per-expert layout that transformers or vLLM reload quantized experts from
        experts=ExpertsLayout(
            "GptOssExperts", transposed=True, interleaved=True, bias=True, checkpoint_names=None
        ),
        router="router",
        num_experts_key="num_local_experts",
    ),
)

_BY_EXPERTS_CLASS: dict[str, MoELayout] = {
    layout.experts.experts_class: layout for layout in MOE_LAYOUTS
}
_BY_BLOCK_CLASS: dict[str, MoELayout] = {layout.block_class: layout for layout in MOE_LAYOUTS}


def moe_layout_for_experts(experts: torch.nn.Module) -> MoELayout | None:
    """The layout of a known ``...Experts`` module's family, or None."""
    return _BY_EXPERTS_CLASS.get(type(experts).__name__)


@dataclass(frozen=True)
class MoEBlock:
    """One sparse block found in a model.

    :param name: the block's dotted name in the model
    :param layout: its family's layout
    :param num_experts: routed experts (read from the experts module)
    :param top_k: experts per token (from the model config, when it has one)
    """

    name: str
    layout: MoELayout
    num_experts: int
    top_k: int | None

    def _child(self, attribute: str | None) -> str | None:
        return None if attribute is None else f"{self.name}.{attribute}"

    @property
    def experts(self) -> str:
        """The experts module's dotted name."""
        return f"{self.name}.{self.layout.experts_attribute}"

    @property
    def router(self) -> str:
        """The router's dotted name."""
        return f"{self.name}.{self.layout.router}"

    @property
    def shared_experts(self) -> str | None:
        """The shared experts MLP's dotted name, if the family has one."""
        return self._child(self.layout.shared_experts)

    @property
    def exact_modules(self) -> tuple[str, ...]:
        """Dotted names of the block's routing modules, kept in full precision by default."""
        return tuple(f"{self.name}.{a}" for a in self.layout.exact_modules)


def _config_value(model: torch.nn.Module, key: str) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    value = getattr(config, key, None)
    return int(value) if isinstance(value, int) else None


def find_moe_blocks(model: torch.nn.Module) -> list[MoEBlock]:
    """Every sparse block of a known family in ``model``, in model order.

    A block whose experts were already unfolded into one Linear per expert is still found
    (its experts module carries ``num_experts``).

    :param model: the model
    """
    blocks = []
    for name, module in model.named_modules():
        layout = _BY_BLOCK_CLASS.get(type(module).__name__)
        if layout is None:
            continue
        experts = getattr(module, layout.experts_attribute, None)
        if experts is None:
            continue
        num_experts = getattr(experts, "num_experts", None)
        if not isinstance(num_experts, int):
            num_experts = _config_value(model, layout.num_experts_key) or 0
        blocks.append(
            MoEBlock(
                name=name,
                layout=layout,
                num_experts=num_experts,
                top_k=_config_value(model, layout.top_k_key),
            )
        )
    return blocks


class UnknownExpertsError(ValueError):
    """A module looks like experts (a 3-D weight, or ``Expert`` in its class name) but no
    MoE layout describes it."""


def _looks_like_experts(module: torch.nn.Module) -> bool:
    if getattr(module, UNFOLDED_MARKER, False):
        return False
    if any(p.dim() == 3 for p in module.parameters(recurse=False)):
        return True
    return "expert" in type(module).__name__.lower()


def check_expert_modules(
    model: torch.nn.Module,
    skip: Iterable[str] = (),
    extra_layouts: Iterable[MoELayout] = (),
) -> list[str]:
    """Refuse expert-like modules that no layout describes.

    An expert-like module is one holding a 3-D parameter of its own, or whose class name
    contains ``Expert``; it is known when its class is the experts class of a layout (in
    ``MOE_LAYOUTS`` or ``extra_layouts``), sits inside a known block as its shared experts,
    or is an experts module already unfolded into Linears. Convolutions (whose weights are
    3-D or more by nature) are not expert-like.

    :param model: the model
    :param skip: dotted names the caller was told to leave alone (an explicit ``ignore``);
        an unknown module among them is returned instead of refused
    :param extra_layouts: layouts given by the user for families the table lacks
    :return: the unknown expert-like modules that ``skip`` covers
    :raises UnknownExpertsError: naming the first unknown module, its class and its 3-D
        parameters, and what to pass
    """
    skipped = set(skip)
    known_experts = set(_BY_EXPERTS_CLASS) | {x.experts.experts_class for x in extra_layouts}
    known_blocks = set(_BY_BLOCK_CLASS) | {x.block_class for x in extra_layouts}
    shared: set[str] = set()
    for name, module in model.named_modules():
        layout = _BY_BLOCK_CLASS.get(type(module).__name__) or next(
            (x for x in extra_layouts if x.block_class == type(module).__name__), None
        )
        if layout is not None and layout.shared_experts is not None:
            shared.add(f"{name}.{layout.shared_experts}")
    skipped_unknown = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if isinstance(module, torch.nn.modules.conv._ConvNd) or cls in known_experts:
            continue
        if cls in known_blocks or name in shared or not _looks_like_experts(module):
            continue
        if isinstance(module, torch.nn.ModuleList | torch.nn.ModuleDict):
            continue  # a list of experts: its Linears are matched as any Linear
        if not any(True for _ in module.parameters(recurse=False)):
            continue  # a container named "...Expert..." whose Linears are matched as usual
        if name in skipped:
            skipped_unknown.append(name)
            continue
        three_d = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
        raise UnknownExpertsError(
            f"{name} ({cls}) looks like mixture-of-experts weights "
            f"({'3-D parameters ' + ', '.join(three_d) if three_d else 'its class name'}) "
            f"but no MoE layout describes it (known experts classes: "
            f"{', '.join(sorted(known_experts))}); its experts would stay uncompressed. "
            "Describe its layout in the recipe's `moe_mappings` (experts_class, gate_up, down, "
            "transposed, interleaved, bias, checkpoint_names; see docs/moe.md), or add "
            f"{name!r} to `ignore` to leave it in full precision"
        )
    return skipped_unknown

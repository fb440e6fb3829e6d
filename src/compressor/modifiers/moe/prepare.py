"""What a compressing modifier does to a model's experts on initialize: unfold the known
ones, refuse (or, when ignored, skip) the unknown ones, and name the routing to keep exact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from compressed_tensors.utils.match import is_match
from loguru import logger

from compressor.architectures.moe import MoELayout, check_expert_modules, moe_layout_for_experts
from compressor.modifiers.moe.experts import LinearExperts, unfold_experts

__all__ = ["PreparedExperts", "keep_routing_exact", "prepare_experts"]


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

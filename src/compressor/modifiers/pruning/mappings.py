"""Which modules share a structured unit, per architecture ("related modules" as typed data).

A ``StructureMapping`` names, relative to each repeated block, the modules that *produce* the
units (their output rows or channels, with biases and BatchNorm vectors) and the modules that
*consume* them (their input columns or channels). Removing a unit removes it from all of them,
so the pruned model computes exactly what the masked one did. Recipes may pass their own
mappings (``mappings:``) for architectures not listed here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from compressed_tensors.utils import is_match
from pydantic import BaseModel, ConfigDict, Field

from compressor.modifiers.pruning.coupling import Coupling, Member
from compressor.utils.architecture import find_decoder_layers_path

__all__ = [
    "ARCHITECTURES",
    "Kind",
    "StructureMapping",
    "build_couplings",
    "default_mappings",
    "sequential_conv_mappings",
]

Kind = Literal["rows", "heads", "channels"]


class StructureMapping(BaseModel):
    """Modules coupled through one kind of unit, in every block of ``blocks``.

    :param blocks: dotted name of the ModuleList of repeated blocks; unset: the whole model
        is the one block (names are then full module names)
    :param producers: modules whose outputs are the units (Linear rows, Conv2d out channels)
    :param norms: BatchNorm layers over the units, between producer and consumer
    :param consumers: modules reading the units (Linear columns, Conv2d in channels)
    :param num_units: how many units (heads: key-value heads); unset: the first producer's
        output size (one unit per row or channel)
    :param config: model config keys to set to ``kept units * value`` after the clean-up
    :param attributes: ``"relative.module.attribute"`` set to ``kept units * value`` after the
        clean-up (for modules that store their own head counts)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    blocks: str | None = None
    producers: list[str] = Field(min_length=1)
    norms: list[str] = Field(default_factory=list)
    consumers: list[str] = Field(default_factory=list)
    num_units: int | None = Field(default=None, gt=0)
    config: dict[str, int] = Field(default_factory=dict)
    attributes: dict[str, int] = Field(default_factory=dict)


# ---------------------------------------------------------------- architectures
def _llama(model: torch.nn.Module, kind: Kind) -> list[StructureMapping]:
    blocks = find_decoder_layers_path(model)
    config = model.config
    if kind == "rows":
        return [
            StructureMapping(
                blocks=blocks,
                producers=["mlp.gate_proj", "mlp.up_proj"],
                consumers=["mlp.down_proj"],
                config={"intermediate_size": 1},
            )
        ]
    if kind == "heads":
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if config.num_attention_heads % kv_heads:
            raise ValueError(
                f"num_attention_heads={config.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}"
            )
        return [
            StructureMapping(
                blocks=blocks,
                producers=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                consumers=["self_attn.o_proj"],
                num_units=kv_heads,
                config={
                    "num_key_value_heads": 1,
                    "num_attention_heads": config.num_attention_heads // kv_heads,
                },
            )
        ]
    raise ValueError(f"{config.model_type} models have no {kind} to prune")


def _bert(model: torch.nn.Module, kind: Kind) -> list[StructureMapping]:
    blocks = find_decoder_layers_path(model)
    config = model.config
    if kind == "rows":
        return [
            StructureMapping(
                blocks=blocks,
                producers=["intermediate.dense"],
                consumers=["output.dense"],
                config={"intermediate_size": 1},
            )
        ]
    if kind == "heads":
        head_size = config.hidden_size // config.num_attention_heads
        return [
            StructureMapping(
                blocks=blocks,
                producers=["attention.self.query", "attention.self.key", "attention.self.value"],
                consumers=["attention.output.dense"],
                num_units=config.num_attention_heads,
                attributes={
                    "attention.self.num_attention_heads": 1,
                    "attention.self.all_head_size": head_size,
                },
            )
        ]
    raise ValueError(f"bert models have no {kind} to prune")


#: model_type -> the function giving its mappings for a kind of unit
ARCHITECTURES: dict[str, Callable[[torch.nn.Module, Kind], list[StructureMapping]]] = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "bert": _bert,
}

_CHANNEL_PRESERVING = (
    torch.nn.ReLU,
    torch.nn.ReLU6,
    torch.nn.LeakyReLU,
    torch.nn.GELU,
    torch.nn.SiLU,
    torch.nn.Sigmoid,
    torch.nn.Tanh,
    torch.nn.Hardswish,
    torch.nn.Identity,
    torch.nn.Dropout,
    torch.nn.Dropout2d,
    torch.nn.MaxPool2d,
    torch.nn.AvgPool2d,
)


def sequential_conv_mappings(
    model: torch.nn.Module,
) -> tuple[list[StructureMapping], dict[str, str]]:
    """Channel mappings of a plain ``nn.Sequential`` conv net, read in module order.

    Each Conv2d is coupled with the BatchNorm2d after it and the next Conv2d, across
    channel-preserving layers (activations, dropout, pooling).

    :return: the mappings, and for every Conv2d without a coupled conv the reason
    :raises ValueError: when the model is not built from nested ``nn.Sequential`` only
    """
    for name, module in model.named_modules():
        if any(True for _ in module.children()) and not isinstance(module, torch.nn.Sequential):
            raise ValueError(
                f"{type(model).__name__} is not a plain nn.Sequential conv net "
                f"({name or 'the model'} is a {type(module).__name__} with its own forward), so "
                "its channel coupling cannot be read from the module order"
            )
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    mappings, unpaired = [], {}
    for i, (name, conv) in enumerate(leaves):
        if not isinstance(conv, torch.nn.Conv2d):
            continue
        if conv.groups != 1:
            unpaired[name] = f"it is a grouped convolution (groups={conv.groups})"
            continue
        norms: list[str] = []
        reason = "it is the last layer"
        consumer = None
        for next_name, nxt in leaves[i + 1 :]:
            if isinstance(nxt, torch.nn.BatchNorm2d) and nxt.num_features == conv.out_channels:
                norms.append(next_name)
            elif isinstance(nxt, _CHANNEL_PRESERVING):
                continue
            elif (
                isinstance(nxt, torch.nn.Conv2d)
                and nxt.groups == 1
                and nxt.in_channels == conv.out_channels
            ):
                consumer = next_name
                break
            else:
                reason = f"the next layer {next_name} is a {type(nxt).__name__}"
                break
        if consumer is None:
            unpaired[name] = reason
        else:
            mappings.append(StructureMapping(producers=[name], norms=norms, consumers=[consumer]))
    return mappings, unpaired


def default_mappings(model: torch.nn.Module, kind: Kind) -> list[StructureMapping]:
    """The built-in mappings of ``model`` for ``kind``.

    :raises ValueError: for an architecture without one, saying what to pass instead
    """
    if kind == "channels":
        try:
            return sequential_conv_mappings(model)[0]
        except ValueError as err:
            raise ValueError(
                f"{err}. Pass mappings: [{{producers: [<conv>], norms: [<batchnorm>], "
                "consumers: [<next conv>]}}, ...] in the recipe"
            ) from None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    builder = ARCHITECTURES.get(model_type or "")
    if builder is None:
        example = (
            "{blocks: model.layers, producers: [mlp.up_proj], consumers: [mlp.down_proj], "
            "config: {intermediate_size: 1}}"
            if kind == "rows"
            else "{blocks: model.layers, producers: [attn.q, attn.k, attn.v], "
            "consumers: [attn.o], num_units: <heads>, config: {num_attention_heads: 1}}"
        )
        raise ValueError(
            f"no {kind} mapping for {type(model).__name__} (model_type={model_type!r}); known "
            f"architectures: {', '.join(sorted(ARCHITECTURES))}. Pass mappings: [{example}] "
            "in the recipe"
        )
    return builder(model, kind)


def _member(model: torch.nn.Module, name: str, dim: int) -> Member:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"mapping names module {name!r}, which the model does not have") from None
    return Member(name=name, module=module, dim=dim)


def build_couplings(
    model: torch.nn.Module,
    mappings: list[StructureMapping],
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
) -> list[Coupling]:
    """Concrete couplings for every block of every mapping; a coupling is kept when its first
    producer matches ``targets`` (all when unset) and not ``ignore``.

    :raises ValueError: when a member's size is not a multiple of the unit count
    """
    couplings = []
    for mapping in mappings:
        if mapping.blocks is None:
            blocks: list[tuple[str, torch.nn.Module]] = [("", model)]
        else:
            container = model.get_submodule(mapping.blocks)
            blocks = [(f"{mapping.blocks}.{i}.", b) for i, b in enumerate(container)]
        for prefix, block in blocks:
            members = [_member(model, prefix + p, 0) for p in mapping.producers]
            members += [_member(model, prefix + p, 0) for p in mapping.norms]
            members += [_member(model, prefix + p, 1) for p in mapping.consumers]
            name, first = members[0].name, members[0].module
            if targets and not is_match(name, first, targets):
                continue
            if ignore and is_match(name, first, ignore):
                continue
            n_units = mapping.num_units or first.weight.shape[0]
            for member in members:
                size = member.module.weight.shape[member.dim or 0]
                if size % n_units:
                    raise ValueError(
                        f"{member.name} has {size} {'outputs' if member.dim == 0 else 'inputs'}, "
                        f"not a multiple of num_units={n_units} (the head or unit count must "
                        "divide every coupled projection)"
                    )
            couplings.append(
                Coupling(
                    name=name,
                    members=members,
                    n_units=n_units,
                    config=dict(mapping.config),
                    attributes=dict(mapping.attributes),
                    block=block,
                )
            )
    return couplings

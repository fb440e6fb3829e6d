"""Which modules share a structured unit ("related modules" as typed data), made concrete.

The per-architecture tables (``compressor.architectures``) give each family's
``StructureMapping``s; :func:`build_couplings` turns mappings into the ``Coupling``s a pruning
modifier masks and shrinks. Recipes may pass their own mappings (``mappings:``) for
architectures not listed there.
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import is_match

from compressor.architectures import (
    BY_MODEL_TYPE,
    Architecture,
    Kind,
    StructureMapping,
    architecture_for,
    find_decoder_layers_path,
    sequential_conv_mappings,
)
from compressor.modifiers.pruning.coupling import Coupling, Member

__all__ = [
    "ARCHITECTURES",
    "Kind",
    "StructureMapping",
    "build_couplings",
    "default_mappings",
    "sequential_conv_mappings",
]

#: model_type -> its table, for the architectures with row and head mappings
ARCHITECTURES: dict[str, Architecture] = {
    model_type: architecture
    for model_type, architecture in BY_MODEL_TYPE.items()
    if architecture.has("rows") and architecture.has("heads")
}


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
    try:
        architecture = architecture_for(model, needs=kind)
    except ValueError as err:
        example = (
            "{blocks: model.layers, producers: [mlp.up_proj], consumers: [mlp.down_proj], "
            "config: {intermediate_size: 1}}"
            if kind == "rows"
            else "{blocks: model.layers, producers: [attn.q, attn.k, attn.v], "
            "consumers: [attn.o], num_units: <heads>, config: {num_attention_heads: 1}}"
        )
        raise ValueError(f"{err}. Pass mappings: [{example}] in the recipe") from None
    builder = architecture.rows if kind == "rows" else architecture.heads
    assert builder is not None
    return builder(model.config, find_decoder_layers_path(model))  # type: ignore[arg-type]


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

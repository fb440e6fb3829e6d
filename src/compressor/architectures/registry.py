"""The architecture tables by ``model_type``, and the one lookup that reads them."""

from __future__ import annotations

import torch

from compressor.architectures import bert, gemma, gpt2, llama, moe_families, opt, phi3
from compressor.architectures.base import Architecture, Feature

__all__ = [
    "ARCHITECTURES",
    "BY_MODEL_TYPE",
    "architecture_for",
    "find_architecture",
    "known_model_types",
    "model_type_of",
]

#: one table per family; the order is the order in which unknown models are searched for
#: their layers (see ``find_decoder_layers_path``)
ARCHITECTURES: tuple[Architecture, ...] = (
    llama.ARCHITECTURE,
    gemma.ARCHITECTURE,
    phi3.ARCHITECTURE,
    gpt2.ARCHITECTURE,
    opt.ARCHITECTURE,
    bert.ARCHITECTURE,
    moe_families.MIXTRAL,
    moe_families.QWEN_MOE,
    moe_families.DEEPSEEK_V3,
)

#: model_type -> its family's table
BY_MODEL_TYPE: dict[str, Architecture] = {
    model_type: architecture
    for architecture in ARCHITECTURES
    for model_type in architecture.model_types
}

_WHAT = {
    None: "architecture table",
    "rows": "rows mapping",
    "heads": "heads mapping",
    "spinquant": "SpinQuant mapping",
    "norms": "norm mappings",
    "smoothquant": "SmoothQuant mappings",
    "awq": "AWQ mappings",
}


def model_type_of(model: torch.nn.Module) -> str | None:
    """``model.config.model_type``, or None for a model without one."""
    return getattr(getattr(model, "config", None), "model_type", None)


def known_model_types(feature: Feature | None = None) -> list[str]:
    """The model types with a table (that holds ``feature``, when given), sorted."""
    return sorted(
        model_type
        for model_type, architecture in BY_MODEL_TYPE.items()
        if feature is None or architecture.has(feature)
    )


def find_architecture(model: torch.nn.Module) -> Architecture | None:
    """The table of the model's family, or None for an unknown model type."""
    return BY_MODEL_TYPE.get(model_type_of(model) or "")


def architecture_for(model: torch.nn.Module, needs: Feature | None = None) -> Architecture:
    """The table of the model's family.

    :param model: a transformers model (its ``config.model_type`` decides)
    :param needs: a field the table must hold (``rows``, ``heads``, ``spinquant``, ``norms``,
        ``smoothquant``, ``awq``)
    :raises ValueError: naming the model class, its model_type and the known model types
    """
    architecture = find_architecture(model)
    if architecture is None or (needs is not None and not architecture.has(needs)):
        raise ValueError(
            f"no {_WHAT[needs]} for {type(model).__name__} "
            f"(model_type={model_type_of(model)!r}); known architectures: "
            f"{', '.join(known_model_types(needs))}"
        )
    return architecture

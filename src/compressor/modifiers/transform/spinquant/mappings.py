"""Where SpinQuant's rotations go in a model: the typed mappings of the architecture tables.

Targets are compressed-tensors match strings (a module name, a class name or ``re:<regex>``),
resolved with :func:`compressed_tensors.utils.match_named_modules`. The mappings of each
family live in ``compressor.architectures``; recipes pass their own for other models.
"""

from __future__ import annotations

import torch

from compressor.architectures import NormMapping, SpinQuantMapping, architecture_for

__all__ = [
    "NormMapping",
    "SpinQuantMapping",
    "infer_mapping_from_model",
    "infer_norm_mappings_from_model",
]


def infer_mapping_from_model(model: torch.nn.Module) -> SpinQuantMapping:
    """The rotation mapping of a known architecture.

    :raises ValueError: for other architectures, saying to pass ``mappings``
    """
    try:
        mapping = architecture_for(model, needs="spinquant").spinquant
    except ValueError as err:
        raise ValueError(
            f"SpinQuantModifier: {err}. Pass `mappings` explicitly (a SpinQuantMapping: "
            "embedding, attn_q, attn_k, attn_v, attn_o, mlp_in, mlp_out, lm_head)."
        ) from None
    assert mapping is not None
    return mapping.model_copy(deep=True)


def infer_norm_mappings_from_model(model: torch.nn.Module) -> list[NormMapping]:
    """The norm -> linears mappings of a known architecture.

    :raises ValueError: for LayerNorm models (naming the norm class) and other architectures,
        saying to pass ``norm_mappings``
    """
    layer_norms = sorted({type(m).__name__ for m in model.modules() if _is_layer_norm(m)})
    if layer_norms:
        raise ValueError(
            f"SpinQuantModifier: {type(model).__name__} normalises with {', '.join(layer_norms)} "
            "(mean-subtracting, with a bias). R1 needs norms that commute with a rotation: "
            "RMSNorm does; LayerNorm does only after centring every residual writer and folding "
            "its bias (QuaRot's conversion to RMSNorm), which is not done here; only RMSNorm "
            "models are supported (Llama, Mistral, Qwen2, Qwen3, or others with mappings and "
            "norm_mappings)"
        )
    try:
        norms = architecture_for(model, needs="norms").norms
    except ValueError as err:
        raise ValueError(
            f"SpinQuantModifier: {err}. Pass `norm_mappings` explicitly (a list of "
            "NormMapping: norm, linears)."
        ) from None
    return [mapping.model_copy(deep=True) for mapping in norms]


def _is_layer_norm(module: torch.nn.Module) -> bool:
    # torch's LayerNorm, or a model's own class of that name that carries a bias (OPT, GPT-2)
    return isinstance(module, torch.nn.LayerNorm) or (
        type(module).__name__.endswith("LayerNorm")
        and isinstance(getattr(module, "bias", None), torch.Tensor)
    )

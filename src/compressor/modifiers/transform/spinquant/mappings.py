"""Where SpinQuant's rotations go in a model: the typed mappings of the architecture tables.

Targets are compressed-tensors match strings (a module name, a class name or ``re:<regex>``),
resolved with :func:`compressed_tensors.utils.match_named_modules`. The mappings of each
family live in ``compressor.architectures``; recipes pass their own for other models.
"""

from __future__ import annotations

import torch

from compressor.architectures import NormMapping, SpinQuantMapping, architecture_for
from compressor.modifiers.transform.spinquant.centring import is_layer_norm

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
    """The norm -> linears mappings of a known architecture (RMSNorm families, and OPT's
    LayerNorms, which the modifier centres: ``spinquant/centring.py``).

    :raises ValueError: for other architectures, saying to pass ``norm_mappings`` (naming the
        LayerNorm class of a LayerNorm model)
    """
    try:
        norms = architecture_for(model, needs="norms").norms
    except ValueError as err:
        layer_norms = sorted({type(m).__name__ for m in model.modules() if is_layer_norm(m)})
        if layer_norms:
            raise ValueError(
                f"SpinQuantModifier: {type(model).__name__} normalises with "
                f"{', '.join(layer_norms)} (mean-subtracting, with a bias) and its norms are not "
                f"in the architecture tables: {err}. LayerNorm models are rotated after their "
                "residual stream is centred, which needs every norm and every residual writer: "
                "pass `norm_mappings` and `mappings` (with position_embedding if the model adds "
                "one), or use an RMSNorm model (Llama, Mistral, Qwen2, Qwen3) or OPT"
            ) from None
        raise ValueError(
            f"SpinQuantModifier: {err}. Pass `norm_mappings` explicitly (a list of "
            "NormMapping: norm, linears)."
        ) from None
    return [mapping.model_copy(deep=True) for mapping in norms]

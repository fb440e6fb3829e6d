"""GPT-2's ``Conv1D`` layers (transformers' Linear with a transposed weight) as ``nn.Linear``.

Every quantization and pruning path here works on ``nn.Linear`` (``out x in`` weights), as
compressed-tensors does. ``conv1d_to_linear`` swaps each ``Conv1D`` for the ``nn.Linear``
that computes the same function, as DeepSpeed's own GPT-2 compression example does before
compressing (``convert_conv1d_to_linear``). The converted names are recorded on the model so
that a checkpoint is written back in the ``Conv1D`` layout (``in x out``) that the model's
class reloads; a quantized checkpoint of them has no format (compressed-tensors stores
Linear layers only) and is refused when saved.
"""

from __future__ import annotations

import torch
from loguru import logger

__all__ = ["CONVERTED_CONV1D", "conv1d_hint", "conv1d_layout_state_dict", "conv1d_to_linear"]

#: model attribute listing the modules ``conv1d_to_linear`` converted
CONVERTED_CONV1D = "_compressor_converted_conv1d"


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def conv1d_to_linear(model: torch.nn.Module) -> list[str]:
    """Replace every ``Conv1D`` of ``model`` by the equivalent ``nn.Linear`` (same device,
    dtype and values; the weight transposed), in place.

    :return: the names of the converted modules (also recorded on the model)
    """
    converted = []
    for name, module in list(model.named_modules()):
        if not _is_conv1d(module):
            continue
        weight = module.weight
        linear = torch.nn.Linear(
            module.nx,
            module.nf,
            bias=module.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        converted.append(name)
    if converted:
        previous = list(getattr(model, CONVERTED_CONV1D, []))
        setattr(model, CONVERTED_CONV1D, previous + converted)
        logger.info(
            "{} Conv1D layers ({} ...) replaced by the equivalent nn.Linear (weight transposed); "
            "checkpoints are written back in the Conv1D layout",
            len(converted),
            converted[0],
        )
    return converted


def conv1d_layout_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's state dict with the converted layers' weights back in the ``Conv1D``
    layout (``in x out``), for ``save_pretrained``; None when nothing was converted.

    :raises ValueError: when a converted layer is quantized (no format holds it)
    """
    names = getattr(model, CONVERTED_CONV1D, None)
    if not names:
        return None
    quantized = [n for n in names if hasattr(model.get_submodule(n), "quantization_scheme")]
    if quantized:
        raise ValueError(
            f"{quantized[:3]} (of {len(quantized)}) were GPT-2 Conv1D layers: compressed-tensors "
            "stores quantized Linear layers only, and the model's class reloads these layers "
            "as Conv1D, so no checkpoint format holds them quantized; nothing was written. "
            "Leave them out of the quantization (ignore) to save, or save the fake-quantized "
            "weights yourself with the Linear layout"
        )
    state = model.state_dict()
    for name in names:
        key = f"{name}.weight"
        state[key] = state[key].t().contiguous()
    return state


def conv1d_hint(model: torch.nn.Module) -> str:
    """A sentence for errors about targets that match no Linear, when the model has
    ``Conv1D`` layers (empty otherwise)."""
    if not any(_is_conv1d(m) for m in model.modules()):
        return ""
    return (
        "; the model's projections are GPT-2 Conv1D layers: convert them first with "
        "compressor.utils.conv1d.conv1d_to_linear(model) (as DeepSpeed's GPT-2 example does)"
    )

"""A ``README.md`` model card for a saved checkpoint: what the recipe did and what it left.

Unstructured and N:M sparsity are saved as dense weights (compressed-tensors ships no sparse
format), so the card records the sparsity actually measured in the weights.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize

from compressor.recipe import Recipe

__all__ = [
    "MODEL_CARD_FILE",
    "effective_weight",
    "is_model_card",
    "linear_sparsity",
    "model_card",
]

MODEL_CARD_FILE = "README.md"
# the card's fixed line, by which a README.md is recognised as ours
_PRODUCED_BY = "Produced by `compressor` with this recipe:"


def effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight a module computes with: fake-quantized by its calibrated scheme, else as is.

    :param module: a layer with a ``weight``
    :return: the weight, detached
    """
    weight = module.weight.detach()
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
        return weight
    zero_point = getattr(module, "weight_zero_point", None)
    return fake_quantize(weight, module.weight_scale, zero_point, scheme.weights)


@torch.no_grad()
def linear_sparsity(model: torch.nn.Module) -> tuple[float, dict[str, float]]:
    """Fraction of exact zeros in the effective weights of every ``nn.Linear``.

    :param model: the model
    :return: the overall fraction, and one per module type (the last part of the name,
        such as ``q_proj``)
    """
    zeros: dict[str, int] = defaultdict(int)
    sizes: dict[str, int] = defaultdict(int)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and isinstance(module.weight, torch.Tensor):
            kind = name.rsplit(".", 1)[-1]
            weight = effective_weight(module)
            zeros[kind] += int((weight == 0).sum())
            sizes[kind] += weight.numel()
    total = sum(sizes.values())
    overall = sum(zeros.values()) / total if total else 0.0
    return overall, {kind: zeros[kind] / sizes[kind] for kind in sorted(sizes)}


def _describe_args(args: Any) -> str:
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if args.group_size is not None:
        strategy += f" {args.group_size}"
    kind = f"{getattr(args.type, 'value', args.type)}{args.num_bits}"
    symmetry = "symmetric" if args.symmetric else "asymmetric"
    dynamic = " dynamic" if args.dynamic else ""
    return f"{kind} {symmetry} {strategy}{dynamic}"


def _schemes(model: torch.nn.Module) -> dict[str, list[str]]:
    modules: dict[str, list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None:
            parts = [
                f"{role.replace('_', ' ')} {_describe_args(getattr(scheme, role))}"
                for role in ("weights", "input_activations", "output_activations")
                if getattr(scheme, role) is not None
            ]
            modules["; ".join(parts)].append(name)
    return modules


def _modifier_line(modifier: Any) -> str:
    args = modifier.recipe_args()  # as recipe.yaml has it (e.g. the layers an angular run chose)
    return f"- `{type(modifier).__name__}`: `{json.dumps(args, sort_keys=True)}`"


def model_card(model: torch.nn.Module, recipe: Recipe) -> str:
    """Markdown describing a compressed model: the recipe's modifiers (one line each), the
    measured sparsity of its Linear weights overall and per module type, and its quantization
    schemes when it has any.

    :param model: the compressed model
    :param recipe: the recipe that produced it
    :return: the card's text
    """
    overall, per_kind = linear_sparsity(model)
    lines = ["# Compressed model", "", _PRODUCED_BY, ""]
    lines += [_modifier_line(m) for m in recipe.modifiers] or ["- (no modifiers)"]
    lines += ["", "## Sparsity", ""]
    lines += [
        "Fraction of exact zeros in the (effective) weights of the Linear layers, stored as "
        "dense weights:",
        "",
        f"- overall: {overall:.4f}",
    ]
    lines += [f"- `{kind}`: {fraction:.4f}" for kind, fraction in per_kind.items()]
    schemes = _schemes(model)
    if schemes:
        lines += ["", "## Quantization", ""]
        for scheme, names in schemes.items():
            lines.append(f"- {scheme} on {len(names)} module(s)")
    return "\n".join(lines) + "\n"


def is_model_card(text: str) -> bool:
    """Whether ``text`` (a ``README.md``) is a card ``model_card`` wrote.

    :param text: the file's text
    :return: True for our card
    """
    return _PRODUCED_BY in text.split("\n", 4)[:4]

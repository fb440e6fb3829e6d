"""A ``README.md`` model card for a saved checkpoint: what the recipe did and what it left.

Unstructured and N:M sparsity are saved as dense weights (no format that stores only the kept
values reloads in transformers, see ``sparsity.py``), so the card records the sparsity
measured in the weights: the same ``sparsity_config`` that ``config.json`` carries.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from compressor.checkpoint.sparsity import (
    WeightZeros,
    config_of_zeros,
    effective_weight,
    linear_sparsity,
    linear_zeros,
)
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


def model_card(
    model: torch.nn.Module, recipe: Recipe, zeros: Mapping[str, WeightZeros] | None = None
) -> str:
    """Markdown describing a compressed model: the recipe's modifiers (one line each), the
    measured sparsity of its Linear weights overall and per module type, and its quantization
    schemes when it has any.

    :param model: the compressed model
    :param recipe: the recipe that produced it
    :param zeros: every Linear's zeros as the save counted them (``linear_zeros``), so the
        weights are not read again; read from the model when None
    :return: the card's text
    """
    zeros = zeros if zeros is not None else linear_zeros(model)
    overall, per_kind = linear_sparsity(model, zeros)
    schemes = _schemes(model)
    lines = ["# Compressed model", "", _PRODUCED_BY, ""]
    lines += [_modifier_line(m) for m in recipe.modifiers] or ["- (no modifiers)"]
    lines += ["", "## Sparsity", ""]
    lines += _sparsity_lines(zeros, bool(schemes))
    lines += [
        "",
        "Fraction of exact zeros in the (effective) weights of the Linear layers, stored as "
        "dense weights:",
        "",
        f"- overall: {overall:.4f}",
    ]
    lines += [f"- `{kind}`: {fraction:.4f}" for kind, fraction in per_kind.items()]
    if schemes:
        lines += ["", "## Quantization", ""]
        for scheme, names in schemes.items():
            lines.append(f"- {scheme} on {len(names)} module(s)")
    return "\n".join(lines) + "\n"


def _sparsity_lines(zeros: Mapping[str, WeightZeros], quantized: bool) -> list[str]:
    config = config_of_zeros(zeros)
    if config is None:
        return ["No Linear layer is sparse (`config.json` records no `sparsity_config`)."]
    structure = config.sparsity_structure or "unstructured"
    if structure != "unstructured":
        pruned, group = structure.split(":")
        structure += f" (at least {pruned} zeros in every {group} consecutive inputs)"
    ignore = f", ignore {config.ignore}" if config.ignore else ""
    return [
        "`config.json` records it as compressed-tensors' `sparsity_config` (under "
        "`quantization_config`):",
        "",
        f"- structure: {structure}",
        f"- sparse modules: targets {config.targets}{ignore}",
        f"- global sparsity (all Linear weights): {config.global_sparsity:.4f}",
        f"- stored: `{config.format}` (the zeros are in the weights; no format that stores only "
        "the kept values reloads in transformers), "
        + ("also quantized (below)" if quantized else "not quantized"),
    ]


def is_model_card(text: str) -> bool:
    """Whether ``text`` (a ``README.md``) is a card ``model_card`` wrote.

    :param text: the file's text
    :return: True for our card
    """
    return _PRODUCED_BY in text.split("\n", 4)[:4]

"""What a checkpoint records about its zeros: compressed-tensors' ``sparsity_config``,
measured from the weights.

compressed-tensors describes a sparse model with a ``SparsityCompressionConfig`` (the
``sparsity_config`` inside ``config.json``'s ``quantization_config``): the storage ``format``,
the sparse modules (``targets``, ``ignore``), the ``global_sparsity`` and the
``sparsity_structure`` (``unstructured`` or ``N:M``). The formats that store only the kept
values (``sparse-bitmask``, ``sparse-24-bitmask``) are "legacy" in compressed-tensors 0.20: it
has no compressor for them, and transformers (5.x) loads such a checkpoint with the weights
missing and newly initialised. So the weights are written dense and the config says
``format: dense``, with the structure and the modules recorded; transformers reloads it as
it reloads any dense checkpoint.

Everything is measured on the weights the model computes with (``effective_weight``), not
taken from a recipe, so a card or config can never claim a structure the weights lack.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import compressed_tensors
import torch
from compressed_tensors.base import QUANTIZATION_CONFIG_NAME, SPARSITY_CONFIG_NAME
from compressed_tensors.config import CompressionFormat, SparsityCompressionConfig
from compressed_tensors.quantization import QuantizationStatus
from compressed_tensors.quantization.lifecycle.forward import fake_quantize

__all__ = [
    "SPARSE_MODULE_THRESHOLD",
    "WeightZeros",
    "config_of_zeros",
    "effective_weight",
    "linear_sparsity",
    "linear_zeros",
    "n_m_structure",
    "sparsity_config",
    "weight_zeros",
    "write_sparsity_config",
]

# a Linear whose weights are at least this fraction zero counts as pruned: far above what
# rounding to 4 bits or more leaves at zero in a dense layer, below any sparsity worth
# recording (an N:M Linear counts whatever its fraction, by its structure)
SPARSE_MODULE_THRESHOLD = 0.25
# the N:M structures looked for, commonest first; N zeros in every group of M
_STRUCTURES = ((2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (6, 8))
# the smallest fraction of zeros any of them leaves: a weight with fewer follows none
_LEAST_STRUCTURED = min(pruned / group for pruned, group in _STRUCTURES)


def effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight a module computes with: fake-quantized by its calibrated scheme, else as is
    (also once decompressed after a save: its weight then is the dequantized one, which
    compressed-tensors' forward uses as it is).

    :param module: a layer with a ``weight``
    :return: the weight, detached
    """
    weight = module.weight.detach()
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
        return weight
    status = getattr(module, "quantization_status", None)
    if status is not None and status >= QuantizationStatus.COMPRESSED:
        return weight
    zero_point = getattr(module, "weight_zero_point", None)
    # NVFP4's group scales are relative to a per-tensor global scale
    global_scale = getattr(module, "weight_global_scale", None)
    return fake_quantize(
        weight, module.weight_scale, zero_point, scheme.weights, global_scale=global_scale
    )


def _linears(
    model: torch.nn.Module, measured: Mapping[str, WeightZeros] | None = None
) -> list[tuple[str, torch.nn.Linear]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and ((measured is not None and name in measured) or isinstance(module.weight, torch.Tensor))
    ]


@torch.no_grad()
def linear_sparsity(
    model: torch.nn.Module, zeros: Mapping[str, WeightZeros] | None = None
) -> tuple[float, dict[str, float]]:
    """Fraction of exact zeros in the effective weights of every ``nn.Linear``.

    :param model: the model
    :param zeros: every Linear's zeros when already counted (``linear_zeros``), else read
    :return: the overall fraction, and one per module type (the last part of the name,
        such as ``q_proj``)
    """
    counts: dict[str, int] = defaultdict(int)
    sizes: dict[str, int] = defaultdict(int)
    for name, (count, numel, _) in (zeros if zeros is not None else linear_zeros(model)).items():
        kind = name.rsplit(".", 1)[-1]
        counts[kind] += count
        sizes[kind] += numel
    total = sum(sizes.values())
    overall = sum(counts.values()) / total if total else 0.0
    return overall, {kind: counts[kind] / sizes[kind] for kind in sorted(sizes)}


def n_m_structure(weight: torch.Tensor) -> tuple[int, int] | None:
    """The N:M structure a 2-D weight follows: ``(N, M)`` when every group of M consecutive
    input weights holds at least N zeros (the first of the usual structures that fits,
    largest N first within an M), None when none does.

    :param weight: a ``(rows, columns)`` weight
    """
    if weight.dim() != 2:
        return None
    return _zeros_structure(weight == 0)


def _zeros_structure(zero: torch.Tensor) -> tuple[int, int] | None:
    """``n_m_structure`` of a weight given where it is zero (a 2-D bool tensor)."""
    for m in sorted({m for _, m in _STRUCTURES}):
        if zero.shape[1] % m:
            continue
        # the fewest zeros in any group decides every N at once: one pass per M
        per_group = zero.reshape(-1, m).sum(dim=1)
        least = int(per_group.min()) if per_group.numel() else m
        for pruned in sorted((n for n, group in _STRUCTURES if group == m), reverse=True):
            if least >= pruned:
                return pruned, m
    return None


class WeightZeros(NamedTuple):
    """What ``sparsity_config`` reads of one Linear's weight: its zeros, its size and the
    N:M structure its zeros follow (None: none, or too few zeros for any)."""

    count: int
    numel: int
    structure: tuple[int, int] | None


@torch.no_grad()
def weight_zeros(zero: torch.Tensor) -> WeightZeros:
    """The ``WeightZeros`` of a weight given where it is zero.

    :param zero: a bool tensor, True where the weight is zero (2-D for a structure)
    """
    count = int(torch.count_nonzero(zero))
    # a weight with too few zeros for any structure need not have its groups counted
    structured = zero.dim() == 2 and count >= _LEAST_STRUCTURED * zero.numel()
    return WeightZeros(count, zero.numel(), _zeros_structure(zero) if structured else None)


@torch.no_grad()
def linear_zeros(
    model: torch.nn.Module, measured: Mapping[str, WeightZeros] | None = None
) -> dict[str, WeightZeros]:
    """The zeros of every ``nn.Linear``'s effective weight, by module name in the model's
    order.

    :param model: the model
    :param measured: Linears already counted (by name: those packed for a save, whose
        weights are gone from the model), taken as they are; the others are read
    """
    measured = measured or {}
    return {
        name: measured.get(name) or weight_zeros(effective_weight(module) == 0)
        for name, module in _linears(model, measured)
    }


@torch.no_grad()
def sparsity_config(
    model: torch.nn.Module, measured: Mapping[str, WeightZeros] | None = None
) -> SparsityCompressionConfig | None:
    """compressed-tensors' ``sparsity_config`` for ``model``, measured; None when no Linear is
    sparse (``config_of_zeros`` of ``linear_zeros``).

    :param model: the model about to be saved
    :param measured: Linears already counted, as ``linear_zeros`` takes them
    """
    return config_of_zeros(linear_zeros(model, measured))


def config_of_zeros(zeros: Mapping[str, WeightZeros]) -> SparsityCompressionConfig | None:
    """compressed-tensors' ``sparsity_config`` of a model whose Linears have these zeros;
    None when no Linear is sparse.

    A Linear is sparse when its effective weight follows an N:M structure or is at least
    ``SPARSE_MODULE_THRESHOLD`` zero. ``sparsity_structure`` is the N:M structure every
    sparse Linear follows (N zeros in every M, as llm-compressor's ``mask_structure`` and its
    checks read it), else ``unstructured``. ``targets`` is ``["Linear"]`` with the dense
    Linears in ``ignore`` when most Linears are sparse, else the sparse Linears' names.
    ``global_sparsity`` is the fraction of zeros over every Linear weight (the model card's
    overall figure). ``format`` is ``dense``: see the module docstring.

    :param zeros: every Linear's zeros by name, in the model's order (``linear_zeros``)
    """
    sparse: list[str] = []
    dense: list[str] = []
    structures: set[tuple[int, int] | None] = set()
    total = size = 0
    for name, (count, numel, structure) in zeros.items():
        total, size = total + count, size + numel
        if structure is not None or count >= SPARSE_MODULE_THRESHOLD * numel:
            sparse.append(name)
            structures.add(structure)
        else:
            dense.append(name)
    if not sparse:
        return None
    common = structures.pop() if len(structures) == 1 else None
    if len(sparse) >= len(dense):
        targets, ignore = ["Linear"], dense
    else:
        targets, ignore = sparse, []
    return SparsityCompressionConfig.load_from_registry(
        CompressionFormat.dense.value,
        targets=targets,
        ignore=ignore,
        global_sparsity=round(total / size, 6),
        sparsity_structure=f"{common[0]}:{common[1]}" if common else "unstructured",
    )


def write_sparsity_config(directory: str | Path, config: SparsityCompressionConfig) -> None:
    """Record ``config`` as the ``sparsity_config`` of ``directory/config.json``'s
    ``quantization_config``, which is created (compressed-tensors, format ``dense``, nothing
    quantized) for a model that has none.

    :param directory: a saved checkpoint
    :param config: what ``sparsity_config`` measured
    """
    path = Path(directory) / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    quantization = data.get(QUANTIZATION_CONFIG_NAME)
    if quantization is None:
        quantization = {
            "quant_method": "compressed-tensors",
            "format": CompressionFormat.dense.value,
            "version": compressed_tensors.__version__,
        }
    # the registry's own flag is no part of the config compressed-tensors reads
    quantization[SPARSITY_CONFIG_NAME] = config.model_dump(exclude={"registry_requires_subclass"})
    data[QUANTIZATION_CONFIG_NAME] = quantization
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

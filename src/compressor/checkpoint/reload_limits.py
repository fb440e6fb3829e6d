"""What transformers cannot reload from a compressed-tensors checkpoint, handled at save time:
embeddings written unpacked, and warnings for the checkpoints that only other runtimes (vLLM)
read as written."""

from __future__ import annotations

import torch
from loguru import logger

from compressor.modifiers.moe import LinearExperts

__all__ = [
    "has_experts",
    "unpacked_embeddings",
    "warn_expert_activations",
    "warn_unloadable_zero_points",
]


def unpacked_embeddings(model: torch.nn.Module) -> None:
    """Give quantized embeddings a format that keeps their ``weight`` tensor.

    A packed format replaces ``weight`` by ``weight_packed``; transformers, reloading, then
    initialises the embedding's missing ``weight`` and fails. The unpacked formats store the
    integer (or fp8) codes as ``weight`` with their scales, which it reloads: larger than
    packed below 8 bits, still smaller than the dense embedding.
    """
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, torch.nn.Embedding) or scheme is None or scheme.weights is None:
            continue
        unpacked = "naive-quantized" if scheme.weights.type == "int" else "float-quantized"
        if scheme.format != unpacked:
            logger.info(
                "quantized embedding {} is saved in the {} format ({} codes unpacked): "
                "transformers reloads embeddings only unpacked",
                name,
                unpacked,
                scheme.weights.num_bits,
            )
            scheme.format = unpacked


def warn_unloadable_zero_points(model: torch.nn.Module, quantization_format: str) -> None:
    """Asymmetric weights in the packed format store packed zero points, which
    transformers (5.x, with compressed-tensors 0.20) cannot load back into a model: it
    expects them unpacked and refuses the checkpoint (vllm-project/llm-compressor#1704).
    The checkpoint is still written, for runtimes that read it (vLLM); the user is told."""
    if "pack" not in quantization_format:
        return
    asymmetric = [
        name
        for name, module in model.named_modules()
        if getattr(getattr(module, "quantization_scheme", None), "weights", None) is not None
        and not module.quantization_scheme.weights.symmetric
    ]
    if asymmetric:
        logger.warning(
            "{} module(s) have asymmetric weights (e.g. {}): their zero points are saved packed, "
            "which transformers' from_pretrained cannot load yet (llm-compressor issue #1704); "
            "use symmetric weights for a checkpoint that transformers reloads",
            len(asymmetric),
            asymmetric[0],
        )


def has_experts(model: torch.nn.Module) -> bool:
    return any(isinstance(module, LinearExperts) for module in model.modules())


def warn_expert_activations(model: torch.nn.Module, quantization_format: str) -> None:
    """transformers (5.x) reloads the per-expert Linears of a mixture-of-experts checkpoint
    into its fused experts by dequantizing their weights: activation quantization of the
    experts is not run after ``from_pretrained`` (their static input scales are unexpected
    keys), and int-quantized experts (8-bit activations with int weights) do not load at all.
    vLLM runs both. The checkpoint is written as it is; the user is told."""
    quantized = [
        f"{name}.{n}"
        for name, experts in model.named_modules()
        if isinstance(experts, LinearExperts)
        for n, m in experts.named_modules()
        if getattr(m, "quantization_scheme", None) is not None
        and (m.quantization_scheme.input_activations or m.quantization_scheme.output_activations)
    ]
    if not quantized:
        return
    logger.warning(
        "{} expert Linear(s) quantize activations (e.g. {}; format {}): transformers' "
        "from_pretrained {}; vLLM runs them quantized. For a checkpoint that transformers "
        "reloads exactly, quantize the experts' weights only (e.g. W4A16)",
        len(quantized),
        quantized[0],
        quantization_format,
        "cannot load int-quantized experts"
        if "int" in quantization_format
        else "dequantizes expert weights into its fused experts and runs their activations "
        "in full precision",
    )

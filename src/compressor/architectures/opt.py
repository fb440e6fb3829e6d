"""OPT: decoder layers under ``model.decoder``; only the layers are known."""

from __future__ import annotations

from compressor.architectures.base import Architecture

__all__ = ["ARCHITECTURE"]

ARCHITECTURE = Architecture(
    family="opt",
    model_types=("opt",),
    layers="model.decoder.layers",
    base_layers="decoder.layers",
)

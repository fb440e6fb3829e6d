"""What the library knows of each model architecture, one table per family.

Each family module (``llama``, ``bert``, ``gemma``, ``phi3``, ``gpt2``, ``opt``) holds its
model types, where its layers live, and the typed mappings the techniques read: which modules
share a row or a head (pruning), which play which role around the residual stream and which
norms feed them (SpinQuant), which modules a per-channel scale moves between (SmoothQuant,
AWQ). ``moe`` holds the mixture-of-experts layouts (sparse block, fused experts, router,
shared experts, config keys) and finds the sparse blocks of a model; ``moe_families`` the
smoothing mappings of the mixture-of-experts decoders (Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V3). ``conv`` reads the channel coupling of plain ``nn.Sequential``
conv nets. ``architecture_for(model)`` is the lookup.

This is a bottom layer: of this library it may import ``compressor.utils`` only (never
``core``, ``modifiers``, ``recipe`` or what sits above them).
"""

from compressor.architectures.base import Architecture, Feature
from compressor.architectures.conv import BATCH_NORMS, sequential_conv_mappings
from compressor.architectures.layers import (
    DECODER_LAYER_PATHS,
    find_decoder_layers,
    find_decoder_layers_path,
)
from compressor.architectures.mappings import (
    Kind,
    NormMapping,
    SmoothingMapping,
    SpinQuantMapping,
    StructureBuilder,
    StructureMapping,
)
from compressor.architectures.moe import (
    MOE_LAYOUTS,
    ExpertsLayout,
    MoEBlock,
    MoELayout,
    UnknownExpertsError,
    check_expert_modules,
    find_moe_blocks,
    moe_layout_for_experts,
)
from compressor.architectures.registry import (
    ARCHITECTURES,
    BY_MODEL_TYPE,
    architecture_for,
    find_architecture,
    known_model_types,
    model_type_of,
)

__all__ = [
    "ARCHITECTURES",
    "BATCH_NORMS",
    "BY_MODEL_TYPE",
    "DECODER_LAYER_PATHS",
    "MOE_LAYOUTS",
    "Architecture",
    "ExpertsLayout",
    "Feature",
    "Kind",
    "MoEBlock",
    "MoELayout",
    "NormMapping",
    "SmoothingMapping",
    "SpinQuantMapping",
    "StructureBuilder",
    "StructureMapping",
    "UnknownExpertsError",
    "architecture_for",
    "check_expert_modules",
    "find_architecture",
    "find_decoder_layers",
    "find_decoder_layers_path",
    "find_moe_blocks",
    "known_model_types",
    "model_type_of",
    "moe_layout_for_experts",
    "sequential_conv_mappings",
]

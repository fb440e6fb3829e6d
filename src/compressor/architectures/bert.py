"""BERT: post-norm encoder blocks whose attention module stores its own head counts."""

from __future__ import annotations

from transformers import PretrainedConfig

from compressor.architectures.base import Architecture
from compressor.architectures.mappings import StructureMapping

__all__ = ["ARCHITECTURE", "head_mappings", "row_mappings"]

MODEL_TYPES = ("bert",)
LAYERS = "bert.encoder.layer"
BASE_LAYERS = "encoder.layer"

# modules of an encoder layer, relative to the layer
QUERY = "attention.self.query"
KEY = "attention.self.key"
VALUE = "attention.self.value"
ATTENTION_OUTPUT = "attention.output.dense"
INTERMEDIATE = "intermediate.dense"
OUTPUT = "output.dense"
# the attention module's own head counts, which its forward reads
SELF_ATTENTION = "attention.self"


def row_mappings(config: PretrainedConfig, blocks: str) -> list[StructureMapping]:
    """MLP neurons: rows of the intermediate dense layer with the output layer's columns.

    :param config: the model config
    :param blocks: dotted name of the encoder layers
    """
    return [
        StructureMapping(
            blocks=blocks,
            producers=[INTERMEDIATE],
            consumers=[OUTPUT],
            config={"intermediate_size": 1},
        )
    ]


def head_mappings(config: PretrainedConfig, blocks: str) -> list[StructureMapping]:
    """Attention heads: rows of query, key and value with the output dense layer's columns.

    BertConfig derives the head size from ``hidden_size / num_attention_heads``, so the
    counts are set on the attention modules, not in the config.

    :param config: the model config (head count and size)
    :param blocks: dotted name of the encoder layers
    """
    head_size = config.hidden_size // config.num_attention_heads
    return [
        StructureMapping(
            blocks=blocks,
            producers=[QUERY, KEY, VALUE],
            consumers=[ATTENTION_OUTPUT],
            num_units=config.num_attention_heads,
            attributes={
                f"{SELF_ATTENTION}.num_attention_heads": 1,
                f"{SELF_ATTENTION}.all_head_size": head_size,
            },
        )
    ]


ARCHITECTURE = Architecture(
    family="bert",
    model_types=MODEL_TYPES,
    layers=LAYERS,
    base_layers=BASE_LAYERS,
    rows=row_mappings,
    heads=head_mappings,
)

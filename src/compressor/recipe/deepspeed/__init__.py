"""DeepSpeed ``compression_training`` configs: parsed with DeepSpeed's keys and defaults
(``config``) and converted into our modifiers (``convert``)."""

from compressor.recipe.deepspeed.config import DeepSpeedCompressionConfig, load_deepspeed_config
from compressor.recipe.deepspeed.convert import deepspeed_modifiers

__all__ = ["DeepSpeedCompressionConfig", "deepspeed_modifiers", "load_deepspeed_config"]

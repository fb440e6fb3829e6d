"""Checkpoints: the compressed-tensors format, atomic output directories and the model card."""

from compressor.checkpoint.compressed import (
    enable_compressed_save_pretrained,
    save_compressed,
    save_pretrained_compressed_after,
)
from compressor.checkpoint.directory import OutputArguments, check_output_dir, save_checkpoint
from compressor.checkpoint.kv_cache import restore_kv_cache_quantization
from compressor.checkpoint.transforms import restore_online_rotations

__all__ = [
    "OutputArguments",
    "check_output_dir",
    "enable_compressed_save_pretrained",
    "restore_kv_cache_quantization",
    "restore_online_rotations",
    "save_checkpoint",
    "save_compressed",
    "save_pretrained_compressed_after",
]

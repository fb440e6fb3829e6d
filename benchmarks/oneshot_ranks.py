"""``oneshot`` GPTQ W4A16 in one process against two processes (gloo, ``torchrun``) on the same
calibration rows: the weights compared, the wall time, each rank's peak memory and the time
spent in GPTQ's solves (the part the ranks share out).

A synthetic Llama with SmolLM2-135M's layer shapes (hidden 576, MLP 1536, 9 heads, 3 key/value
heads) and fewer layers is saved once as a checkpoint, so that every process loads the same
weights; the rows are seeded random tokens.

    python -m benchmarks.oneshot_ranks                 # the table, in Markdown, on stdout
    python -m benchmarks.oneshot_ranks --layers 2      # quicker
    python -m benchmarks.oneshot_ranks --smollm2       # the real SmolLM2-135M (30 layers)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, peak_rss_mb

# W4A16 with groups of 64: the preset's 128 does not divide SmolLM2-135M's width of 576
RECIPE = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64}
"""


def _save_model(directory: Path, layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)


def _vocab(model: str | Path) -> int:
    return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])


def _held_out(seq: int, vocab: int) -> torch.Tensor:
    """Two rows no run calibrated on, to compare the models' outputs."""
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(2))


def _child(args: argparse.Namespace) -> None:
    """One process of a run: oneshot, then its measurements (and weights) into ``--out``."""
    import torch.distributed as dist
    from datasets import Dataset

    import compressor.modifiers.quantization.gptq.base as gptq_base
    from compressor import oneshot

    torch.set_num_threads(args.threads)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    solving = [0.0, 0.0]
    solve = gptq_base.gptq_quantize_weights

    def timed(*a, **k):  # the solves this process runs (its share under a process group)
        began, cpu = time.perf_counter(), time.process_time()
        try:
            return solve(*a, **k)
        finally:
            solving[0] += time.perf_counter() - began
            solving[1] += time.process_time() - cpu

    gptq_base.gptq_quantize_weights = timed
    ids = torch.randint(
        0, _vocab(args.model), (args.samples, args.seq), generator=torch.Generator().manual_seed(1)
    )
    rows = Dataset.from_dict({"input_ids": ids.tolist()})
    began, cpu = time.perf_counter(), time.process_time()
    model = oneshot(
        args.model,
        RECIPE,
        rows,
        num_calibration_samples=args.samples,
        max_seq_length=args.seq,
        batch_size=1,
    )
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    out = Path(args.out)
    if rank == 0:
        weights = {k: v for k, v in model.state_dict().items() if k.endswith("weight")}
        torch.save(weights, out / "weights.pt")
        with torch.no_grad():
            torch.save(
                model(input_ids=_held_out(args.seq, _vocab(args.model))).logits, out / "logits.pt"
            )
    stats = {
        "wall_s": wall,
        "cpu_s": cpu,
        "solve_s": solving[0],
        "solve_cpu_s": solving[1],
        "peak_rss_mb": peak_rss_mb(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(stats))
    if dist.is_initialized():
        dist.destroy_process_group()


def _run(model: Path, out: Path, args: argparse.Namespace, procs: int, threads: int) -> list[dict]:
    out.mkdir()
    child = [
        "-m", "benchmarks.oneshot_ranks", "--child", "--model", str(model), "--out", str(out),
        "--samples", str(args.samples), "--seq", str(args.seq), "--threads", str(threads),
    ]  # fmt: skip
    if procs > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}"]
        command += child[0:1] + child[1:]
    else:
        command = [sys.executable, *child]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    with (out / "log.txt").open("w") as log:  # the library logs to stderr
        done = subprocess.run(command, env=env, cwd=out, stderr=log, stdout=log)
    if done.returncode:
        tail = (out / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed:\n{tail}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--out")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--smollm2", action="store_true", help="the real SmolLM2-135M instead of a synthetic Llama"
    )
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.smollm2:
            from benchmarks.models import prepare

            source = prepare("smollm2-135m", ROOT / "build" / "bench-models")
            (root / "model").symlink_to(source, target_is_directory=True)
            what = "SmolLM2-135M (30 layers)"
        else:
            _save_model(root / "model", args.layers)
            what = f"synthetic Llama ({args.layers} layers of SmolLM2-135M's shapes)"
        runs = {
            "1 process, 1 thread": (1, 1),
            "1 process, 2 threads": (1, 2),
            "2 processes (gloo), 1 thread each": (2, 1),
        }
        results = {}
        for index, (label, (procs, threads)) in enumerate(runs.items()):
            out = root / f"run{index}"
            results[label] = (_run(root / "model", out, args, procs, threads), out)
        first = results["1 process, 1 thread"][1]
        reference = torch.load(first / "weights.pt")
        logits = torch.load(first / "logits.pt")
        from transformers import LlamaForCausalLM

        with torch.no_grad():  # what quantizing changed, to put the differences in scale
            dense = LlamaForCausalLM.from_pretrained(root / "model")(
                input_ids=_held_out(args.seq, _vocab(root / "model"))
            )
        quantization = (logits - dense.logits).pow(2).mean().sqrt()
        print(f"oneshot GPTQ W4A16 (groups of 64), {what}, {args.samples} rows of {args.seq} "
              "seeded random tokens\n")  # fmt: skip
        print(
            "| run | wall s | CPU s (per rank) | GPTQ solves: wall s; CPU s (per rank) | "
            "peak RSS MB (per rank) | "
            "weights vs 1 process, 1 thread | held-out logits vs it: RMS, as a share of "
            "the RMS change quantization made | logits vs the dense model, RMS |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for label, (stats, out) in results.items():
            weights = torch.load(out / "weights.pt")
            worst = max((weights[k] - v).abs().max().item() for k, v in reference.items())
            differ = sum(int((weights[k] != v).sum()) for k, v in reference.items())
            own = torch.load(out / "logits.pt")
            gap = own - logits
            error = (own - dense.logits).pow(2).mean().sqrt()
            total = sum(v.numel() for v in reference.values())
            wall = max(s["wall_s"] for s in stats)
            cpus = ", ".join(f"{s['cpu_s']:.1f}" for s in stats)
            solves = ", ".join(f"{s['solve_s']:.2f}; {s['solve_cpu_s']:.2f}" for s in stats)
            peaks = ", ".join(f"{s['peak_rss_mb']:.0f}" for s in stats)
            print(
                f"| {label} | {wall:.1f} | {cpus} | {solves} | {peaks} | "
                f"max abs diff {worst:.2g}, {differ} of {total} differ | "
                f"{gap.pow(2).mean().sqrt():.2g}, {gap.pow(2).mean().sqrt() / quantization:.1%} | "
                f"{error:.4g} |"
            )


if __name__ == "__main__":
    main()

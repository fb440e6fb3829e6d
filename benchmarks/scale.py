"""``python -m benchmarks.scale`` (``make bench SUITE=scale``): GPTQ W4A16 with the decoder
layers on disk, from 16M to 1B parameters, ours against llm-compressor.

Each model (``llama-16m`` ... ``llama-1b`` in ``benchmarks/models.py``: 16 layers, random
weights from seed 0) is saved once as an fp32 checkpoint under ``build/bench-models``. Every
run is its own process that loads that checkpoint with the decoder layers offloaded to disk
(accelerate's ``device_map`` / ``offload_folder``, as the ``gptq`` suite's on-disk case),
calibrates GPTQ (groups of 128, block 128, dampening 0.01) on the same pre-tokenized rows, and
saves the compressed checkpoint. The sides alternate (ours first on one model, the peer first
on the next), never at the same time. Per run: wall and CPU time of the process and of each
phase, the peak RSS of each phase on its own (the high-water mark restarted as the phase
begins), and the memory the issue's model allows (``apply_budgets``): the largest decoder
layer, the embeddings and head, the calibration activations a layer reads and writes and the
largest layer's Hessians, plus a fixed overhead measured on the smallest model. Writes
``<date>-scale.{json,md,png}`` to ``bench/results``.

python -m benchmarks.scale                          # the four models, both sides
python -m benchmarks.scale --models llama-16m,llama-100m --no-peers
python -m benchmarks.scale --render bench/results/<date>-scale.json   # table and chart again
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT
from benchmarks.harness import RECIPES, run_process, side_env, side_python
from benchmarks.models import MODELS, prepare

SCALE_MODELS = ("llama-16m", "llama-100m", "llama-400m", "llama-1b")
MODEL_CACHE = ROOT / "build" / "bench-models"
RECIPE = "gptq_w4a16"  # groups of 128, block 128, dampening 0.01 (the gptq suite's)
SIDES = ("ours", "llmcompressor")
MB = 2**20


def _say(message: str) -> None:
    print(message, flush=True)


def layout(path: Path, samples: int, seq_len: int) -> dict[str, Any]:
    """The bytes that the issue's memory model counts, from the checkpoint's config (an fp32
    model built on the meta device: nothing allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = model.model.layers
    layer_bytes = [sum(p.numel() * 4 for p in layer.parameters()) for layer in layers]
    params = sum(p.numel() for p in model.parameters())
    # one Hessian per distinct input of the largest layer's Linears (q/k/v and gate/up share
    # theirs): in_features^2 fp32 each
    largest = layers[max(range(len(layers)), key=layer_bytes.__getitem__)]
    inputs: dict[tuple[str, int], int] = {}
    for name, module in largest.named_modules():
        if isinstance(module, torch.nn.Linear):
            group = (
                name.rsplit(".", 1)[0] if name.endswith(("q_proj", "k_proj", "v_proj")) else name
            )
            group = "mlp.in" if name.endswith(("gate_proj", "up_proj")) else group
            inputs[(group, module.in_features)] = module.in_features**2 * 4
    hidden = int(config.hidden_size)
    return {
        "params": params,
        "layers": len(layers),
        "model_mb": params * 4 / MB,
        "largest_layer_mb": max(layer_bytes) / MB,
        "embeddings_mb": (params * 4 - sum(layer_bytes)) / MB,  # embeddings, final norm, head
        # the layer's inputs and outputs for every calibration row, fp32
        "activations_mb": 2 * samples * seq_len * hidden * 4 / MB,
        "hessians_mb": sum(inputs.values()) / MB,
    }


def layer_terms_mb(shape: dict[str, Any]) -> float:
    """What the issue's memory model lets grow with the model: the largest decoder layer,
    the embeddings and head, and what calibrating that layer needs (its activations and
    Hessians)."""
    return (
        shape["largest_layer_mb"]
        + shape["embeddings_mb"]
        + shape["activations_mb"]
        + shape["hessians_mb"]
    )


def apply_budgets(report: dict[str, Any]) -> None:
    """Give each run its budget: the fixed overhead of its side (the interpreter, libraries
    and buffers: that side's peak on the smallest model measured, less that model's layer
    terms) plus the model's layer terms. A peak that grows with the whole model instead
    overshoots the budget by a growing factor along the series."""
    overhead: dict[str, float] = {}
    for entry in sorted(report["models"], key=lambda m: m["shape"]["params"]):
        for run in entry["runs"]:
            row = run["row"]
            if row["status"] == "ok" and run["side"] not in overhead:
                overhead[run["side"]] = row["peak_rss_mb"] - layer_terms_mb(entry["shape"])
    report["fixed_overhead_mb"] = overhead
    for entry in report["models"]:
        for run in entry["runs"]:
            row = run["row"]
            if row["status"] in ("ok", "partial") and run["side"] in overhead:
                row["budget_mb"] = overhead[run["side"]] + layer_terms_mb(entry["shape"])
                row["peak_over_budget"] = row["peak_rss_mb"] / row["budget_mb"]


def _memory_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_one(side: str, model: str, path: Path, work: Path, calib: tuple[int, int],
            threads: int, timeout: float) -> dict[str, Any]:  # fmt: skip
    """One process of one side on one model: load (layers on disk), compress, save."""
    python = side_python(side)
    assert python is not None
    spec = {
        "side": side,
        "task": "oneshot",
        "model_path": str(path),
        "recipe": str(RECIPES / side / f"{RECIPE}.yaml"),
        "calibration": MODELS[model].calibration(*calib),
        "eval": None,
        "requires": ["compressor.oneshot", "compressor.modifiers.GPTQModifier"],
        "params": {"layers_on_disk": True, "phase_peaks": True},
        "output_dir": str(work / "checkpoint"),
        "threads": threads,
    }
    before = {"load_avg": os.getloadavg(), "mem_available_mb": _memory_available_mb()}
    result = run_process(python, spec, side_env(side, threads), work, timeout)
    result["before"] = before
    result["load_avg_after"] = os.getloadavg()
    shutil.rmtree(work / "checkpoint", ignore_errors=True)  # a 1B checkpoint is 0.6 GB
    return result


def summarize(run: dict[str, Any], shape: dict[str, Any]) -> dict[str, Any]:
    """One run's row: times, per-layer time, peaks per phase, peak against the budget."""
    if run.get("status") != "ok":
        return {"status": run.get("status"), "reason": run.get("reason", "")[:400]}
    phases = run["phases"]
    own = {name: p.get("phase_peak_rss_mb") for name, p in phases.items()}
    peak = run["process"]["peak_rss_mb"]
    return {
        "status": "ok",
        "process_wall_s": run["process"]["wall_s"],
        "process_cpu_s": run["process"]["cpu_s"],
        "phase_wall_s": {name: p["wall_s"] for name, p in phases.items()},
        "phase_cpu_s": {name: p["cpu_s"] for name, p in phases.items()},
        "compress_s_per_layer": phases["compress"]["wall_s"] / shape["layers"],
        "phase_peak_rss_mb": own,
        "peak_rss_mb": peak,
        "peak_over_model": peak / shape["model_mb"],
        "checkpoint_mb": run.get("metrics", {}).get("checkpoint_mb"),
        "load_avg_before": run["before"]["load_avg"],
        "mem_available_mb_before": run["before"]["mem_available_mb"],
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Scale: GPTQ W4A16 with the decoder layers on disk ({report['date']})",
        "",
        report["about"],
        "",
        f"Command: `{report['command']}`. Calibration: {report['calibration']}. "
        f"Threads: {report['threads']} per process. {report['machine']}",
        "",
        "| model | params | fp32 model MB | largest layer MB | embeddings MB | activations MB "
        "| Hessians MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        s = m["shape"]
        lines.append(
            f"| {m['model']} | {s['params'] / 1e6:.1f}M | {s['model_mb']:.0f} | "
            f"{s['largest_layer_mb']:.0f} | {s['embeddings_mb']:.1f} | {s['activations_mb']:.0f} "
            f"| {s['hessians_mb']:.0f} |"
        )
    lines += [
        "",
        "Times in seconds, memory in MB (MiB). *budget*: the issue's goal, one layer's worth "
        "plus the embeddings plus a fixed overhead: largest layer + embeddings + that layer's "
        "activations and Hessians + the side's fixed overhead, taken from its run on the "
        "smallest model (peak less these terms; "
        + ", ".join(f"{k} {v:.0f} MB" for k, v in report.get("fixed_overhead_mb", {}).items())
        + "). Peaks per phase are each phase's own high-water mark. Load average (1 min) as "
        "each run started.",
        "",
        "| model | side | process wall | process CPU | load | compress | s / layer "
        "| CPU s / layer | save | peak load | peak compress | peak save | peak | budget "
        "| peak / budget | peak / model | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        for run in m["runs"]:
            r = run["row"]
            if r["status"] == "partial":
                p = r["phase_peak_rss_mb"]
                # a stopped run's load figures are missing when it wrote no result
                load_s, load_peak = (
                    _maybe(r["phase_wall_s"].get("load"), ".1f"),
                    _maybe(p.get("load"), ".0f"),
                )
                lines.append(
                    f"| {m['model']} | {run['side']} | stopped: {r['reason']} | | {load_s} | | "
                    f"{r['compress_s_per_layer']:.1f} | {_cpu_per_layer(r, m['shape'])} | | "
                    f"{load_peak} | "
                    f"{p.get('compress') or 0:.0f} | | {r['peak_rss_mb']:.0f} | "
                    f"{r.get('budget_mb', 0):.0f} | {r.get('peak_over_budget', 0):.2f} | "
                    f"{r['peak_rss_mb'] / m['shape']['model_mb']:.2f} | "
                    f"{r['load_avg_before'][0]:.1f} |"
                )
                continue
            if r["status"] != "ok":
                lines.append(f"| {m['model']} | {run['side']} | {r['status']}: "
                             f"{r['reason'][:200]} |" + " |" * 15)  # fmt: skip
                continue
            w, p = r["phase_wall_s"], r["phase_peak_rss_mb"]
            lines.append(
                f"| {m['model']} | {run['side']} | {r['process_wall_s']:.1f} | "
                f"{r['process_cpu_s']:.1f} | {w.get('load', 0):.1f} | {w['compress']:.1f} | "
                f"{r['compress_s_per_layer']:.2f} | {_cpu_per_layer(r, m['shape'])} | "
                f"{w.get('save', 0):.1f} | "
                f"{p.get('load') or 0:.0f} | {p.get('compress') or 0:.0f} | "
                f"{p.get('save') or 0:.0f} | {r['peak_rss_mb']:.0f} | {r['budget_mb']:.0f} | "
                f"{r['peak_over_budget']:.2f} | {r['peak_over_model']:.2f} | "
                f"{r['load_avg_before'][0]:.1f} |"
            )
    if report.get("notes"):
        lines += ["", *report["notes"]]
    return "\n".join(lines) + "\n"


def _maybe(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _cpu_per_layer(row: dict[str, Any], shape: dict[str, Any]) -> str:
    """The compress phase's CPU seconds per decoder layer (over the layers a stopped run
    finished, which its row gives), as the table prints it; the figure that a busy machine
    does not inflate as it does wall times."""
    if "compress_cpu_s_per_layer" in row:
        return f"{row['compress_cpu_s_per_layer']:.1f}"
    cpu = row.get("phase_cpu_s", {}).get("compress")
    return "" if cpu is None else f"{cpu / shape['layers']:.1f}"


def chart(report: dict[str, Any], path: Path) -> bool:
    """Compress time per layer and peak memory against parameter count, both sides, with the
    budget and the whole fp32 model for scale; a run stopped part way (``partial``: its
    figures over the layers it finished) is drawn hollow."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    params = [m["shape"]["params"] for m in report["models"]]
    for side, marker, color in (("ours", "o", "tab:blue"), ("llmcompressor", "s", "tab:orange")):
        for status, face in (("ok", color), ("partial", "none")):
            rows = [(m["shape"]["params"], r["row"]) for m in report["models"] for r in m["runs"]
                    if r["side"] == side and r["row"]["status"] == status]  # fmt: skip
            if not rows:
                continue
            label = f"{side}" + (" (stopped part way)" if status == "partial" else "")
            xs = [x for x, _ in rows]
            style = dict(marker=marker, color=color, markerfacecolor=face, label=label)
            ax_t.plot(xs, [r["compress_s_per_layer"] for _, r in rows], **style)
            ax_m.plot(xs, [r["peak_rss_mb"] for _, r in rows], **style)
    ax_m.plot(params, [m["shape"]["model_mb"] for m in report["models"]], color="grey",
              linestyle=":", label="whole fp32 model")  # fmt: skip
    budgets = [
        next((r["row"]["budget_mb"] for r in m["runs"]
              if r["side"] == "ours" and "budget_mb" in r["row"]), float("nan"))
        for m in report["models"]
    ]  # fmt: skip
    ax_m.plot(params, budgets, color="black", linestyle="-.", label="budget (ours)")
    for ax, title, unit in (
        (ax_t, "compress time per layer", "seconds"),
        (ax_m, "peak memory", "MiB"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(unit)
        ax.set_title(f"GPTQ W4A16, layers on disk: {title}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--models", default=",".join(SCALE_MODELS))
    # small, so that the 1B model's 16 layers finish on 2 shared cores; the memory model
    # counts the activations, so a larger set shows in the budget, not as a surprise
    parser.add_argument("--samples", type=int, default=4, help="calibration rows")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side and model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    parser.add_argument("--no-peers", action="store_true", help="run our side only")
    parser.add_argument("--sides", default=",".join(SIDES), help="the sides to run (a,b)")
    parser.add_argument("--append", action="store_true",
                        help="add these runs to the day's outputs of the same name (a long "
                        "series run in parts); a model's runs of the same side and repeat are "
                        "replaced")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="scale", help="the outputs' name after the date")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="run nothing: write the table and chart of this json again")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        _write(report, args.render.parent, args.render.stem)
        _say(f"wrote {args.render.with_suffix('')}.{{json,md,png}}")
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        _say(f"unknown model(s) {unknown}; the scale series: {', '.join(SCALE_MODELS)}")
        return 2
    wanted = [s.strip() for s in args.sides.split(",") if s.strip()]
    if [s for s in wanted if s not in SIDES]:
        _say(f"unknown side(s) in {wanted}; known: {', '.join(SIDES)}")
        return 2
    if args.no_peers:
        wanted = [s for s in wanted if s == "ours"]
    sides = [s for s in SIDES if s in wanted and side_python(s)]
    for side in set(wanted) - set(sides):
        _say(f"peer {side}: not installed (run `make bench-peers-setup`); not run")
    calib = (args.samples, args.seq_len)
    date = datetime.date.today().isoformat()
    report: dict[str, Any] = {
        "date": date,
        "about": (__doc__ or "").split("\n\n")[1].replace("\n", " "),
        "command": " ".join(["python -m benchmarks.scale", *(argv or sys.argv[1:])]),
        "calibration": f"{calib[0]} rows of {calib[1]} tokens from the start of "
        "tinystories_val.txt (pre-tokenized, the same on both sides)",
        "threads": args.threads,
        "machine": f"{os.cpu_count()} CPUs, {_memory_total_mb() / 1024:.0f} GiB memory.",
        "models": [],
    }
    stem = f"{date}-{args.name}"
    if args.append and (args.out / f"{stem}.json").is_file():
        earlier = json.loads((args.out / f"{stem}.json").read_text())
        report["models"] = earlier["models"]
        report["command"] = f"{earlier['command']}; then {report['command']}"
    work = args.out / "tmp" / "scale"
    for index, model in enumerate(models):
        path = prepare(model, MODEL_CACHE)
        shape = layout(path, *calib)
        entry = next((m for m in report["models"] if m["model"] == model), None)
        if entry is None:
            entry = {"model": model, "shape": shape, "runs": []}
            report["models"].append(entry)
            report["models"].sort(key=lambda m: m["shape"]["params"])
        _say(f"== {model}: {shape['params'] / 1e6:.0f}M parameters, {shape['layers']} layers")
        for repeat in range(args.repeats):
            order = sides if (index + repeat) % 2 == 0 else sides[::-1]
            for side in order:
                run = run_one(side, model, path, work / model / f"{side}-{repeat}", calib,
                              args.threads, args.timeout)  # fmt: skip
                row = summarize(run, shape)
                entry["runs"] = [r for r in entry["runs"]
                                 if (r["side"], r["repeat"]) != (side, repeat)]  # fmt: skip
                entry["runs"].append({"side": side, "repeat": repeat, "row": row, "raw": run})
                _say(f"  [{side} #{repeat}] {_brief(row)}")
                _write(report, args.out, stem, args.append)  # after every run: nothing lost
    _say(f"wrote {args.out / stem}.{{json,md,png}}")
    return 0


def _memory_total_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _brief(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason'][:300]}"
    return (
        f"process {row['process_wall_s']:.1f} s, compress {row['phase_wall_s']['compress']:.1f} s "
        f"({row['compress_s_per_layer']:.2f} s/layer), peak {row['peak_rss_mb']:.0f} MB "
        f"(per phase "
        + ", ".join(f"{k} {v:.0f}" for k, v in row["phase_peak_rss_mb"].items() if v)
        + ")"
    )


def _write(report: dict[str, Any], out: Path, stem: str, append: bool = False) -> None:
    """The day's json, table and chart; with ``append``, the models another run has written
    there meanwhile are kept (two parts of a series may run side by side)."""
    out.mkdir(parents=True, exist_ok=True)
    if append and (out / f"{stem}.json").is_file():
        mine = {m["model"] for m in report["models"]}
        others = json.loads((out / f"{stem}.json").read_text())["models"]
        report["models"] += [m for m in others if m["model"] not in mine]
        report["models"].sort(key=lambda m: m["shape"]["params"])
    apply_budgets(report)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float))
    (out / f"{stem}.md").write_text(markdown(report))
    chart(report, out / f"{stem}.png")


if __name__ == "__main__":
    sys.exit(main())

"""Summaries of a suite's runs: medians per side, ratios against each peer, and the three
outputs: ``<date>-<suite>.json``, ``<date>-<suite>.md`` and ``<date>-<suite>.png``."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path
from typing import Any

NON_JOB_PHASES = {"eval", "latency"}  # phases after the job itself, excluded from its peak
WHOLE_PHASES = ("import", "load", "compress", "save")  # a whole-process case, in order
WHOLE_TASKS = ("whole", "import", "floor")  # cases timed from the interpreter's start to its exit


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _job_peak(run: dict[str, Any]) -> float | None:
    """The process's peak RSS at the end of its last job phase (before any evaluation)."""
    peaks = [p["peak_rss_mb"] for n, p in run.get("phases", {}).items() if n not in NON_JOB_PHASES]
    return max(peaks) if peaks else None


def _save_rate(run: dict[str, Any]) -> float | None:
    """Checkpoint megabytes written per second of the save phase (None without a save)."""
    seconds = run.get("phases", {}).get("save", {}).get("wall_s")
    size = run.get("metrics", {}).get("checkpoint_mb")
    return size / seconds if seconds and size is not None else None


def _outside_phases(run: dict[str, Any]) -> float:
    """The process's wall time outside its named phases."""
    inside = sum(p.get("wall_s", 0.0) for p in run.get("phases", {}).values())
    return max(0.0, run["process"]["wall_s"] - inside)


def summarize_side(entry: dict[str, Any], key_phase: str) -> dict[str, Any]:
    runs = [r for r in entry["runs"] if r["status"] == "ok"]
    summary: dict[str, Any] = {"status": entry["status"], "repeats": len(runs)}
    if entry.get("reason"):
        summary["reason"] = entry["reason"]
    if not runs:
        return summary
    summary.update(
        time_s=_median([r["phases"].get(key_phase, {}).get("wall_s") for r in runs]),
        cpu_s=_median([r["phases"].get(key_phase, {}).get("cpu_s") for r in runs]),
        process_wall_s=_median([r["process"]["wall_s"] for r in runs]),
        process_cpu_s=_median([r["process"]["cpu_s"] for r in runs]),
        process_peak_rss_mb=_median([r["process"]["peak_rss_mb"] for r in runs]),
        job_peak_rss_mb=_median([_job_peak(r) for r in runs]),
        import_s=_median([r["phases"].get("import", {}).get("wall_s") for r in runs]),
        save_mb_per_s=_median([_save_rate(r) for r in runs]),
        save_s=_median([r["phases"].get("save", {}).get("wall_s") for r in runs]),
    )
    if any(r["phases"] for r in runs):
        # each phase's median, and what lies outside them: interpreter start, the harness's
        # own imports, and exit (the whole-process cases are timed from start to exit)
        summary["phase_s"] = {
            name: _median([r["phases"].get(name, {}).get("wall_s") for r in runs])
            for name in WHOLE_PHASES
        }
        summary["phase_s"]["other"] = _median([_outside_phases(r) for r in runs])
    metrics: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in runs for k in r.get("metrics", {})):
        values = [r["metrics"][key] for r in runs if r["metrics"].get(key) is not None]
        numeric = values and all(isinstance(v, int | float) for v in values)
        metrics[key] = _median(values) if numeric else (values[0] if values else None)
    summary["metrics"] = metrics
    return summary


def _paired_ratio(ours: list[dict], peer: list[dict], get: Any) -> float | None:
    """Median over repeats of peer/ours, pairing the runs of the same repeat."""
    by_repeat = {r["repeat"]: r for r in ours if r["status"] == "ok"}
    ratios = []
    for run in peer:
        mine = by_repeat.get(run["repeat"])
        if run["status"] == "ok" and mine is not None:
            a, b = get(run), get(mine)
            if a is not None and b:
                ratios.append(a / b)
    return _median(ratios)


def compare(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per peer: speed-up (peer time / ours), process wall ratio, peak memory ratio."""
    sides, key = record["sides"], record["key_phase"]
    ours = sides.get("ours")
    out: dict[str, dict[str, Any]] = {}
    if not ours:
        return out
    for peer, entry in sides.items():
        if peer == "ours":
            continue
        out[peer] = {
            "speedup": _paired_ratio(
                ours["runs"], entry["runs"], lambda r: r["phases"].get(key, {}).get("wall_s")
            ),
            "process_speedup": _paired_ratio(
                ours["runs"], entry["runs"], lambda r: r["process"]["wall_s"]
            ),
            "peak_ratio": _paired_ratio(ours["runs"], entry["runs"], _job_peak),
            "process_cpu_ratio": _paired_ratio(
                ours["runs"], entry["runs"], lambda r: r["process"]["cpu_s"]
            ),
            "process_peak_ratio": _paired_ratio(
                ours["runs"], entry["runs"], lambda r: r["process"]["peak_rss_mb"]
            ),
            "phase_speedup": {
                name: _paired_ratio(
                    ours["runs"],
                    entry["runs"],
                    lambda r, n=name: r["phases"].get(n, {}).get("wall_s"),
                )
                for name in WHOLE_PHASES
            },
        }
    return out


def build_report(
    suite: str, size: str, date: str, records: list[dict[str, Any]], settings: dict[str, Any]
) -> dict[str, Any]:
    import torch

    for record in records:
        record["summary"] = {
            side: summarize_side(entry, record["key_phase"])
            for side, entry in record["sides"].items()
        }
        record["compare"] = compare(record)
    return {
        "suite": suite,
        "size": size,
        "date": date,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": __import__("os").cpu_count(),
        },
        "settings": settings,
        "cases": records,
    }


# ------------------------------------------------------------------ Markdown
def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e5:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


_DETAIL_SKIP = {"ppl", "checkpoint_mb"}


def markdown(report: dict[str, Any], description: str) -> str:
    lines = [
        f"# Benchmark `{report['suite']}` ({report['size']}), {report['date']}",
        "",
        description,
        "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, torch "
        f"{report['machine']['torch']}; {report['settings']['threads']} threads per case. "
        "Times are medians over repeats (process-level times from the OS's rusage of each "
        "case process; *job* time is the named phase inside it; *import s* the import of the "
        "library, *save MB/s* the checkpoint's size over the save phase; *job peak* is the process's "
        "VmHWM before evaluation, *process peak* its VmHWM at the end). Ratios are medians of per-repeat ratios, sides alternating.",
        "",
        "| case | model | side | job phase | job s | job CPU s | process s | import s "
        "| save MB/s | job peak MB | process peak MB | checkpoint MB | ppl | details |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in report["cases"]:
        for side, s in rec["summary"].items():
            if s["status"] != "ok" or not s.get("repeats"):
                reason = s.get("reason", s["status"]).replace("|", "/").replace("\n", " ")
                lines.append(
                    f"| {rec['case']} | {rec['model']} | {side} | - | **{s['status']}**: "
                    f"{reason[:200]} | | | | | | | | | |"
                )
                continue
            m = s.get("metrics", {})
            details = ", ".join(
                f"{k}={_f(v, 3)}" for k, v in m.items() if k not in _DETAIL_SKIP and v is not None
            )
            lines.append(
                f"| {rec['case']} | {rec['model']} | {side} | {rec['key_phase']} | "
                f"{_f(s['time_s'])} | {_f(s['cpu_s'])} | {_f(s['process_wall_s'])} | "
                f"{_f(s.get('import_s'))} | {_f(s.get('save_mb_per_s'), 1)} | "
                f"{_f(s['job_peak_rss_mb'], 0)} | {_f(s['process_peak_rss_mb'], 0)} | "
                f"{_f(m.get('checkpoint_mb'), 3)} | {_f(m.get('ppl'), 3)} | {details} |"
            )
    comparisons = [(rec, peer, c) for rec in report["cases"] for peer, c in rec["compare"].items()]
    comparisons = [(r, p, c) for r, p, c in comparisons if c["speedup"] or c["process_speedup"]]
    if comparisons:
        lines += [
            "",
            "## Ours against the peer, same run",
            "",
            "Speed-up = peer time / our time (above 1: we are faster). "
            "Peak ratio = peer job peak / our job peak (above 1: we use less).",
            "",
            "| case | model | peer | job speed-up | process speed-up | peak ratio | ppl ours | ppl peer |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for rec, peer, c in comparisons:
            ppl_ours = rec["summary"]["ours"].get("metrics", {}).get("ppl")
            ppl_peer = rec["summary"][peer].get("metrics", {}).get("ppl")
            lines.append(
                f"| {rec['case']} | {rec['model']} | {peer} | {_f(c['speedup'])}x | "
                f"{_f(c['process_speedup'])}x | {_f(c['peak_ratio'])} | {_f(ppl_ours, 3)} | "
                f"{_f(ppl_peer, 3)} |"
            )
    lines += _whole_process_lines(report)
    lines += ["", f"Chart: `{report['suite']}` PNG beside this file. Raw runs: the JSON beside it."]
    return "\n".join(lines) + "\n"


def _whole_process_lines(report: dict[str, Any]) -> list[str]:
    """The whole-process cases: each side's process from interpreter start to exit, split into
    its phases, and the ratios of the two sides' runs taken in turns in this one run."""
    cases = [r for r in report["cases"] if r.get("task") in WHOLE_TASKS]
    if not cases:
        return []
    lines = [
        "",
        "## Whole process",
        "",
        "Each side in a fresh process, timed by the harness from before the interpreter "
        "starts to its exit: import (the library, with torch and transformers as it pulls "
        "them in), load (model, tokenizer, calibration rows), compress (`oneshot`), save "
        "(the compressed checkpoint to disk); *other* is the rest (interpreter start, the "
        "harness's own imports, exit). Nothing else runs in the process. CPU is user + "
        "system time of the whole process; peak is its VmHWM.",
        "",
        "| case | model | side | process s | CPU s | peak MB | import s | load s | compress s "
        "| save s | other s | save MB/s | checkpoint MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in cases:
        for side, s in rec["summary"].items():
            if s["status"] != "ok" or not s.get("repeats"):
                reason = s.get("reason", s["status"]).replace("|", "/").replace("\n", " ")
                lines.append(f"| {rec['case']} | {rec['model']} | {side} | **{s['status']}**: "
                             f"{reason[:200]} | | | | | | | | | |")  # fmt: skip
                continue
            phase = s.get("phase_s", {})
            lines.append(
                f"| {rec['case']} | {rec['model']} | {side} | {_f(s['process_wall_s'])} | "
                f"{_f(s['process_cpu_s'])} | {_f(s['process_peak_rss_mb'], 0)} | "
                + " | ".join(_f(phase.get(n)) for n in (*WHOLE_PHASES, "other"))
                + f" | {_f(s.get('save_mb_per_s'), 1)} | "
                f"{_f(s.get('metrics', {}).get('checkpoint_mb'), 3)} |"
            )
    ratios = [(r, p, c) for r in cases for p, c in r["compare"].items() if c["process_speedup"]]
    if ratios:
        lines += [
            "",
            "Ratios, peer / ours, of the runs paired by repeat (the sides alternate: ours, "
            "peer, peer, ours, ...; above 1: ours is faster or smaller):",
            "",
            "| case | model | peer | process speed-up | CPU ratio | peak ratio | import | load "
            "| compress | save |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for rec, peer, c in ratios:
            phases = c.get("phase_speedup", {})
            lines.append(
                f"| {rec['case']} | {rec['model']} | {peer} | **{_f(c['process_speedup'])}x** | "
                f"{_f(c.get('process_cpu_ratio'))} | {_f(c.get('process_peak_ratio'))} | "
                + " | ".join(_f(phases.get(n)) for n in WHOLE_PHASES)
                + " |"
            )
    return lines


# ------------------------------------------------------------------ chart
def chart(report: dict[str, Any], path: Path) -> str | None:
    """One PNG: the job time per case (left) and the accuracy or ratio figure (right), each
    side's bar beside the other's. Returns why no chart was drawn, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no chart drawn"
    cases = [r for r in report["cases"] if any(s.get("repeats") for s in r["summary"].values())]
    if not cases:
        return "no case produced figures: no chart drawn"
    sides = list(dict.fromkeys(side for r in cases for side in r["summary"]))
    right_key, right_label = "ppl", "perplexity (lower is better)"
    if not any(r["summary"].get(s, {}).get("metrics", {}).get("ppl") for r in cases for s in sides):
        for key, label in (("step_ratio", "step time / plain step"), ("speedup", "speed-up")):
            if any(
                r["summary"].get(s, {}).get("metrics", {}).get(key) for r in cases for s in sides
            ):
                right_key, right_label = key, label
                break
    labels = [f"{r['case']}\n{r['model']}" for r in cases]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(cases) + 4), 4.8))
    width = 0.8 / max(1, len(sides))
    for i, side in enumerate(sides):
        xs = [j + (i - (len(sides) - 1) / 2) * width for j in range(len(cases))]
        # an evaluation-only case (FP) has no job time to show
        left = [
            0.0 if r["key_phase"] == "eval" else r["summary"].get(side, {}).get("time_s") or 0.0
            for r in cases
        ]
        right = [r["summary"].get(side, {}).get("metrics", {}).get(right_key) or 0.0 for r in cases]
        axes[0].bar(xs, left, width, label=side)
        axes[1].bar(xs, right, width, label=side)
    axes[0].set_ylabel("job time, s (median)")
    axes[1].set_ylabel(right_label)
    for ax in axes:
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=8)
    fig.suptitle(f"compressor bench: {report['suite']} ({report['size']}, {report['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(report: dict[str, Any], out: Path, description: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{report['date']}-{report['suite']}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md")}
    why = chart(report, stem.with_suffix(".png"))
    report["chart"] = why or stem.with_suffix(".png").name
    if why is None:
        paths["png"] = stem.with_suffix(".png")
    paths["json"].write_text(json.dumps(report, indent=1, default=float))
    paths["md"].write_text(markdown(report, description))
    return paths


def write_index(out: Path) -> Path:
    """``latest.md``: a link to the newest table of each suite (what the README points at)."""
    newest: dict[str, Path] = {}
    for path in sorted(out.glob("*-*.md")):
        if path.name == "latest.md":
            continue
        suite = path.stem.split("-", 3)[-1]
        newest[suite] = path
    lines = ["# Latest benchmark tables", "", "| suite | table | chart |", "|---|---|---|"]
    for suite, path in sorted(newest.items()):
        png = path.with_suffix(".png")
        chart_link = f"[{png.name}]({png.name})" if png.is_file() else "-"
        lines.append(f"| {suite} | [{path.name}]({path.name}) | {chart_link} |")
    index = out / "latest.md"
    index.write_text("\n".join(lines) + "\n")
    return index

"""The benchmark harness end to end on a tiny case, and its aggregation rules.

No test here asserts a time: only that the figures are measured, recorded and reported."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.__main__ import main  # noqa: E402

from benchmarks import harness, report  # noqa: E402


def _run(repeat: int, key_s: float, wall: float, peak: float, ppl: float | None = None) -> dict:
    return {
        "status": "ok",
        "repeat": repeat,
        "metrics": {"ppl": ppl} if ppl is not None else {},
        "phases": {
            "load": {"wall_s": 0.1, "cpu_s": 0.1, "peak_rss_mb": peak / 2},
            "compress": {"wall_s": key_s, "cpu_s": key_s, "peak_rss_mb": peak},
            "eval": {"wall_s": 5.0, "cpu_s": 5.0, "peak_rss_mb": peak * 10},
        },
        "process": {"wall_s": wall, "cpu_s": wall, "peak_rss_mb": peak * 10, "exit_code": 0},
    }


def test_medians_and_paired_ratios():
    ours = [_run(0, 1.0, 10, 100, 5.0), _run(1, 3.0, 12, 110), _run(2, 2.0, 11, 120)]
    # the peer is 2x slower in every repeat, though its times alone vary more than ours
    peer = [_run(0, 2.0, 20, 200, 6.0), _run(1, 6.0, 24, 220), _run(2, 4.0, 22, 240)]
    record = {
        "key_phase": "compress",
        "sides": {
            "ours": {"status": "ok", "runs": ours},
            "llmcompressor": {"status": "ok", "runs": peer},
        },
    }
    summary = report.summarize_side(record["sides"]["ours"], "compress")
    assert summary["time_s"] == 2.0 and summary["process_wall_s"] == 11
    # the job's peak is taken before evaluation, the process's over everything
    assert summary["job_peak_rss_mb"] == 110 and summary["process_peak_rss_mb"] == 1100
    assert summary["metrics"]["ppl"] == 5.0
    ratios = report.compare(record)["llmcompressor"]
    assert ratios["speedup"] == pytest.approx(2.0)
    assert ratios["process_speedup"] == pytest.approx(2.0)
    assert ratios["peak_ratio"] == pytest.approx(2.0)


def test_import_time_and_save_rate_are_summarised_and_tabled():
    runs = []
    for repeat, (import_s, save_s) in enumerate([(1.0, 2.0), (3.0, 4.0), (2.0, 1.0)]):
        run = _run(repeat, 1.0, 10, 100, 5.0)
        run["phases"]["import"] = {"wall_s": import_s, "cpu_s": import_s, "peak_rss_mb": 50}
        run["phases"]["save"] = {"wall_s": save_s, "cpu_s": save_s, "peak_rss_mb": 100}
        run["metrics"]["checkpoint_mb"] = 40.0
        runs.append(run)
    summary = report.summarize_side({"status": "ok", "runs": runs}, "compress")
    assert summary["import_s"] == 2.0
    assert summary["save_mb_per_s"] == 20.0  # median of 20, 10 and 40 MB/s
    record = {"case": "c", "model": "m", "key_phase": "compress", "compare": {},
              "summary": {"ours": summary}}  # fmt: skip
    table = report.markdown(
        {"suite": "s", "size": "quick", "date": "d", "cases": [record], "settings": {"threads": 2},
         "machine": {"platform": "p", "cpus": 2, "torch": "t"}}, "")  # fmt: skip
    header = next(line for line in table.splitlines() if line.startswith("| case | model | side"))
    row = next(line for line in table.splitlines() if line.startswith("| c | m | ours"))
    columns = [c.strip() for c in header.split("|")]
    cells = [c.strip() for c in row.split("|")]
    assert len(cells) == len(columns)
    assert cells[columns.index("import s")] == "2" and cells[columns.index("save MB/s")] == "20"


def test_a_failed_side_reports_its_reason():
    entry = {"status": "unavailable", "reason": "compressor.x has not landed", "runs": []}
    summary = report.summarize_side(entry, "compress")
    assert summary == {"status": "unavailable", "repeats": 0, "reason": entry["reason"]}


@pytest.mark.integration
@pytest.mark.slow
def test_a_tiny_suite_end_to_end(tmp_path, monkeypatch, capsys):
    from benchmarks.models import MODELS

    text = MODELS["llama-tiny"].text
    if not text.is_file():
        pytest.skip(f"the benchmark text {text} is absent (../shared is missing)")
    monkeypatch.setattr(harness, "PEERS_DIR", tmp_path / "no-peers")
    out = tmp_path / "results"
    code = main(["--suite", "quant", "--size", "smoke", "--case", "FP,W8A8", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "peer llmcompressor: not installed" in printed

    (result_file,) = out.glob("*-quant.json")
    result = json.loads(result_file.read_text())
    cases = {c["case"]: c for c in result["cases"]}
    assert set(cases) == {"FP", "W8A8"}

    fp = cases["FP"]["sides"]["ours"]
    assert fp["status"] == "ok", fp
    (run,) = fp["runs"]
    assert run["process"]["wall_s"] > 0 and run["process"]["cpu_s"] > 0
    assert run["process"]["peak_rss_mb"] > 50  # torch alone is more than this
    ppl = run["metrics"]["ppl"]
    assert math.isfinite(ppl) and 1 < ppl < 2 * 512  # a random model over a 512-token vocabulary

    w8a8 = cases["W8A8"]["sides"]
    assert w8a8["llmcompressor"]["status"] == "absent"
    assert "make bench-peers-setup" in w8a8["llmcompressor"]["reason"]
    ours = w8a8["ours"]
    if ours["status"] == "ok":  # once oneshot and quantization have landed
        assert ours["runs"][0]["metrics"]["checkpoint_mb"] > 0
    else:
        assert ours["status"] == "unavailable" and "has not landed" in ours["reason"]

    table = (out / result_file.with_suffix(".md").name).read_text()
    assert "| FP | llama-tiny | ours |" in table
    assert "latest.md" in {p.name for p in out.iterdir()}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in result["chart"]
    else:
        assert result_file.with_suffix(".png").stat().st_size > 1000


def test_a_case_process_peak_is_its_own_not_the_harness(tmp_path):
    """A forked child's rusage peak also counts the parent's pages it held until exec; the
    harness reports the case's own high-water mark instead."""
    ballast = bytearray(600 << 20)  # 600 MB resident in this (the harness's) process
    ballast[::4096] = b"\x01" * len(ballast[::4096])
    spec = {"side": "ours", "task": "no-such-task", "threads": 1}
    env = harness.side_env("ours", 1)
    result = harness.run_process(Path(sys.executable), spec, env, tmp_path / "case", 300)
    del ballast
    assert result["status"] == "unavailable" and "no runner" in result["reason"]
    own = result["peak_rss_mb_self"]
    assert 0 < own < 600
    assert result["process"]["peak_rss_mb"] == own


def _whole_run(repeat: int, phases: dict[str, float], wall: float, cpu: float, peak: float):
    return {
        "status": "ok",
        "repeat": repeat,
        "metrics": {"checkpoint_mb": 10.0},
        "phases": {n: {"wall_s": s, "cpu_s": s, "peak_rss_mb": peak} for n, s in phases.items()},
        "process": {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak, "exit_code": 0},
    }


def test_whole_process_cases_are_split_into_phases_and_compared_run_by_run():
    phases = {"import": 4.0, "load": 1.0, "compress": 2.0, "save": 1.0}
    ours = [_whole_run(0, phases, 9.0, 8.0, 500), _whole_run(1, phases, 10.0, 8.0, 500)]
    slower = {n: 2 * s for n, s in phases.items()}
    peer = [_whole_run(0, slower, 18.0, 12.0, 600), _whole_run(1, slower, 20.0, 12.0, 600)]
    record = {"case": "RTN whole", "model": "m", "task": "whole", "key_phase": "compress",
              "sides": {"ours": {"status": "ok", "runs": ours},
                        "llmcompressor": {"status": "ok", "runs": peer}}}  # fmt: skip
    summary = report.summarize_side(record["sides"]["ours"], "compress")
    # what lies outside the phases (interpreter start, exit): 9 - 8 and 10 - 8
    assert summary["phase_s"] == {"import": 4.0, "load": 1.0, "compress": 2.0, "save": 1.0,
                                  "other": 1.5}  # fmt: skip
    assert summary["save_mb_per_s"] == 10.0
    ratios = report.compare(record)["llmcompressor"]
    assert ratios["process_speedup"] == pytest.approx(2.0)
    assert ratios["process_cpu_ratio"] == pytest.approx(1.5)
    assert ratios["process_peak_ratio"] == pytest.approx(1.2)
    assert ratios["phase_speedup"] == pytest.approx(dict.fromkeys(phases, 2.0))
    record["summary"] = {side: report.summarize_side(e, "compress")
                         for side, e in record["sides"].items()}  # fmt: skip
    record["compare"] = report.compare(record)
    table = report.markdown(
        {"suite": "s", "size": "quick", "date": "d", "cases": [record], "settings": {"threads": 2},
         "machine": {"platform": "p", "cpus": 2, "torch": "t"}}, "")  # fmt: skip
    section = table.split("## Whole process", 1)[1]
    row = next(line for line in section.splitlines() if line.startswith("| RTN whole | m | ours"))
    assert [c.strip() for c in row.split("|")][4:11] == ["9.50", "8", "500", "4", "1", "2", "1"]
    ratio = next(line for line in section.splitlines() if "| llmcompressor | **" in line)
    assert "**2x**" in ratio and "| 1.50 | 1.20 |" in ratio


def test_whole_process_runner_imports_nothing_heavy_before_its_import_phase():
    """The case process is timed from its start: what it loads before the task's import
    phase (the child, the runner module) must not pull in torch or the library."""
    import subprocess

    probe = (
        "import sys, benchmarks.child, benchmarks.runners.whole\n"
        "print(sorted(m for m in ('torch', 'transformers', 'compressor', 'datasets') "
        "if m in sys.modules))"
    )
    env = harness.side_env("ours", 1)
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_every_whole_process_model_has_its_floor_measured_the_same_way():
    """Beside each whole-process case, the floor under both sides (torch and transformers
    imported, the same load and rows, no library) runs as a whole-process task: timed from the
    interpreter's start, its heavy imports inside its import phase."""
    from benchmarks.runners import whole
    from benchmarks.suites import FLOOR_CASE, gptq_cases, quant_cases

    from benchmarks import child

    for cases in (quant_cases("full"), gptq_cases("full")):
        compared = {(c.model, c.calibration) for c in cases if c.task == "whole"}
        floors = {(c.model, c.calibration) for c in cases if c.name == FLOOR_CASE}
        assert compared and floors == compared
    assert "floor" in child.WHOLE_PROCESS_TASKS and whole.TASKS["ours"]["floor"] is whole.floor


def test_issue_23s_smollm2_cases_score_the_raw_text_from_its_start(tmp_path):
    """The activation-only SmolLM2 table is scored as issue 23 measured it (raw WikiText-2, its
    first windows); a learned case calibrates on text away from those windows."""
    from benchmarks.models import MODELS
    from benchmarks.suites import spinquant_cases

    cases = {c.name: c for c in spinquant_cases("full") if c.model == "smollm2-135m"}
    settings = harness.Settings(out=tmp_path)
    spec = harness._spec(cases["R1R2R4 + A4"], "ours", tmp_path, tmp_path, settings, True)
    assert spec["eval"]["char_start"] == 0 and spec["eval"]["collapse_blank_lines"] is False
    assert spec["eval"]["file"] == str(MODELS["smollm2-135m"].text)
    learned = harness._spec(cases["R1R2 learned + R4 + A4"], "ours", tmp_path, tmp_path,
                            settings, True)  # fmt: skip
    assert learned["calibration"]["char_start"] >= 500_000
    # other models keep their own held-out slice
    stories = next(c for c in spinquant_cases("full") if c.model == "stories260K" and c.eval)
    spec = harness._spec(stories, "ours", tmp_path, tmp_path, settings, True)
    assert spec["eval"]["char_start"] == MODELS["stories260K"].eval_char_start


def test_issue_20s_smollm2_table_uses_the_prune_suites_smollm2_rows(tmp_path):
    """The AWQ/SmoothQuant table on SmolLM2 calibrates and scores on the very rows of the prune
    suite's SmolLM2 cases (16x512 from the start of WikiText-2, 8 windows of 512 from its
    held-out slice), every row on both sides but the FP one, each name selectable by --case."""
    from benchmarks.suites import prune_cases, quant_cases

    settings = harness.Settings(out=tmp_path)
    ours = [c for c in quant_cases("full") if c.model == "smollm2-135m" and c.calibration]
    ours = [c for c in ours if c.calibration == (16, 512)]
    assert [c.name for c in ours] == [
        "W4 asym channel RTN", "W4 asym channel GPTQ", "W4 asym channel AWQ",
        "W4 asym channel AWQ+GPTQ", "W8A8 static", "SmoothQuant 0.8 + W8A8 static",
        "SmoothQuant 0.8 + GPTQ W8A8 static",
    ]  # fmt: skip
    owl = next(c for c in prune_cases("full") if c.model == "smollm2-135m" and c.calibration)
    reference = harness._spec(owl, "ours", tmp_path, tmp_path, settings, True)
    for case in ours:
        assert case.sides == ["ours", "llmcompressor"] and "," not in case.name
        spec = harness._spec(case, "ours", tmp_path, tmp_path, settings, True)
        assert spec["calibration"] == reference["calibration"], case.name
        assert spec["eval"] == reference["eval"], case.name
    fp = [c for c in quant_cases("full") if c.name == "FP 8 windows"]
    assert len(fp) == 1 and fp[0].eval == owl.eval

"""Run the cases of a suite, each in its own process, and measure them as the OS reports.

For every run the parent records the child's wall time and CPU time (user + system) from
``os.wait4`` (the kernel's rusage of that child); the child adds its own phase times, its peak
RSS (VmHWM) at the end of each phase and at its end (the process peak: rusage's would also
count the parent's pages held between fork and exec). Repeats alternate the sides of a
comparison (ours, peer, peer, ours, ...) so a noisy neighbour hurts both alike; figures are
medians over repeats and ratios are medians of the per-repeat ratios.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import api
from benchmarks.common import ROOT
from benchmarks.models import MODELS, ModelUnavailable, prepare

RECIPES = ROOT / "benchmarks" / "recipes"
PEERS_DIR = ROOT / ".venv-peers"
SIDES = ("ours", "llmcompressor", "deepspeed")


@dataclass
class Case:
    """One measured job: a model, a task and, per side, the recipe that side runs."""

    suite: str
    name: str
    model: str
    task: str  # eval | oneshot | latency | train
    recipes: dict[str, str | None]  # side -> recipe file under benchmarks/recipes (None: none)
    calibration: tuple[int, int] | None = None  # (samples, seq_len)
    eval: tuple[int, int | None] | None = None  # (window, max_windows)
    # replaces keys of the model's evaluation text (models.ModelSpec.evaluation): another slice
    # or the raw text, for a protocol fixed elsewhere (an issue's table)
    eval_text: dict[str, Any] = field(default_factory=dict)
    calibration_text: dict[str, Any] = field(default_factory=dict)  # likewise, for calibration
    requires: tuple[str, ...] = ()  # our public API the case needs
    params: dict[str, Any] = field(default_factory=dict)
    save: bool = False
    repeats: int = 1
    key_phase: str = "compress"  # the phase whose time the tables and ratios use

    @property
    def sides(self) -> list[str]:
        return [side for side in SIDES if side in self.recipes]


def side_python(side: str) -> Path | None:
    """The interpreter a side runs with; None when a peer's venv is absent."""
    if side == "ours":
        return Path(sys.executable)
    python = PEERS_DIR / side / "bin" / "python"
    return python if python.is_file() else None


def side_env(side: str, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    pythonpath = [str(ROOT)] if side != "ours" else [str(ROOT / "src"), str(ROOT)]
    env.update(
        PYTHONPATH=os.pathsep.join(pythonpath),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    if side == "deepspeed":
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run_process(
    python: Path, spec: dict[str, Any], env: dict[str, str], work: Path, timeout: float
) -> dict[str, Any]:
    """Run one case process and return its result with the OS's figures under ``process``."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = work / "spec.json", work / "result.json", work / "log.txt"
    spec_path.write_text(json.dumps(spec, indent=2))
    out_path.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        # the child runs in its work folder, so nothing it writes lands elsewhere
        proc = subprocess.Popen(
            [str(python), "-m", "benchmarks.child", str(spec_path), str(out_path)],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        pid = proc.pid
        timed_out = False
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.perf_counter() - start > timeout:
                os.kill(pid, signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # reaped by wait4 above, for its rusage
    if out_path.is_file():
        result = json.loads(out_path.read_text())
    else:
        tail = log_path.read_text(errors="replace")[-1500:]
        why = f"timed out after {timeout:.0f} s" if timed_out else f"exited with {code}"
        result = {"status": "error", "reason": f"case process {why} without a result: {tail}"}
    # the case's own high-water mark (VmHWM, read as it ends): the OS's ru_maxrss of a child
    # also counts the harness's pages, which a forked child holds until it execs (after the
    # harness had prepared SmolLM2, every case read about 1.1 GB); ru_maxrss only when the
    # case died without a result
    own_peak = result.get("peak_rss_mb_self")
    result["process"] = {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": own_peak if own_peak is not None else usage.ru_maxrss / 1024,  # KiB
        "exit_code": code,
    }
    result["log"] = str(log_path)
    return result


@dataclass
class Settings:
    out: Path
    threads: int = 2
    repeats: int | None = None  # overrides each case's own
    peers: bool = True
    timeout: float = 1800.0

    @property
    def work(self) -> Path:
        return self.out / "tmp"


def _spec(case: Case, side: str, model_path: Path, work: Path, settings: Settings, first: bool):
    spec = MODELS[case.model]
    recipe = case.recipes[side]
    return {
        "side": side,
        "task": case.task,
        "model_path": str(model_path),
        "recipe": str(RECIPES / recipe) if recipe else None,
        "calibration": (
            spec.calibration(*case.calibration) | case.calibration_text
            if case.calibration
            else None
        ),
        # perplexity is deterministic: scored on the first repeat only
        "eval": spec.evaluation(*case.eval) | case.eval_text if case.eval and first else None,
        "requires": list(case.requires),
        "params": case.params,
        "output_dir": str(work / "checkpoint") if case.save else None,
        "threads": settings.threads,
    }


def run_case(case: Case, settings: Settings, log: Any = print) -> dict[str, Any]:
    """Every repeat of every side of one case; sides alternate their order each repeat."""
    record: dict[str, Any] = {"case": case.name, "model": case.model, "task": case.task}
    record["key_phase"] = case.key_phase
    record["sides"] = {}
    try:
        model_path = prepare(case.model, settings.work / "models")
    except ModelUnavailable as err:
        log(f"  {case.name}: skipped, {err}")
        for side in case.sides:
            record["sides"][side] = {"status": "unavailable", "reason": str(err), "runs": []}
        return record
    runnable = []
    for side in case.sides:
        python = side_python(side)
        if side == "ours" and (why_not := api.missing(case.requires)):
            record["sides"][side] = {"status": "unavailable", "reason": why_not, "runs": []}
            log(f"  {case.name} [ours]: not run, {why_not}")
            continue
        recipe = case.recipes[side]
        if recipe and not (RECIPES / recipe).is_file():
            why = f"recipe {RECIPES / recipe} is not written yet"
            record["sides"][side] = {"status": "unavailable", "reason": why, "runs": []}
            log(f"  {case.name} [{side}]: not run, {why}")
            continue
        if side != "ours" and (python is None or not settings.peers):
            why = (
                "peers disabled (--no-peers)"
                if not settings.peers
                else f"peer venv {PEERS_DIR / side} absent: run `make bench-peers-setup`; "
                "ours ran alone"
            )
            record["sides"][side] = {"status": "absent", "reason": why, "runs": []}
            continue
        record["sides"][side] = {"status": "ok", "runs": []}
        runnable.append((side, python))
    repeats = settings.repeats or case.repeats
    if "ours" in case.recipes and all(side != "ours" for side, _ in runnable):
        repeats = 1  # nothing to compare with: the peer's figures once are enough
    for r in range(repeats):
        order = runnable if r % 2 == 0 else list(reversed(runnable))
        for side, python in order:
            work = settings.work / "runs" / case.suite / _slug(case.name) / f"{side}-{r}"
            spec = _spec(case, side, model_path, work, settings, first=(r == 0))
            result = run_process(
                python, spec, side_env(side, settings.threads), work, settings.timeout
            )
            result["repeat"] = r
            entry = record["sides"][side]
            entry["runs"].append(result)
            if result["status"] != "ok":
                entry["status"], entry["reason"] = result["status"], result.get("reason", "")
            log(f"  {case.name} [{side} #{r}]: {_brief(result, case.key_phase)}")
        # a side that cannot run (an API not landed) is not worth repeating
        runnable = [(s, p) for s, p in runnable if record["sides"][s]["status"] == "ok"]
        if not runnable:
            break
    return record


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _brief(result: dict[str, Any], key_phase: str) -> str:
    if result["status"] != "ok":
        return f"{result['status']}: {result.get('reason', '')[:300]}"
    phase = result.get("phases", {}).get(key_phase, {})
    ppl = result.get("metrics", {}).get("ppl")
    parts = [f"process {result['process']['wall_s']:.1f} s"]
    if phase:
        parts.append(f"{key_phase} {phase['wall_s']:.2f} s")
    parts.append(f"peak {result['process']['peak_rss_mb']:.0f} MB")
    if ppl is not None:
        parts.append(f"ppl {ppl:.3f}")
    return ", ".join(parts)

"""One case, in its own process: ``python -m benchmarks.child SPEC.json RESULT.json``.

The spec names the side (``ours``, ``llmcompressor``, ``deepspeed``) and the task; the runner
module of that side does the work and returns its metrics. A failure is written to the result
as ``{"status": "error", ...}`` with the traceback, so one broken case never stops a suite.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

from benchmarks.common import NotAvailable, Phases, set_threads, write_result

# tasks timed from the interpreter's start (runners/whole.py): torch is imported inside
# their import phase, so nothing imports it before
WHOLE_PROCESS_TASKS = ("whole", "import", "floor")
RUNNERS = {
    "ours": "benchmarks.runners.ours",
    "llmcompressor": "benchmarks.runners.peer_llmcompressor",
    "deepspeed": "benchmarks.runners.peer_deepspeed",
}


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    # per-phase peaks restart the high-water mark: asked for by the cases that profile memory
    phases = Phases(own_peaks=bool(spec.get("params", {}).get("phase_peaks")))
    try:
        if spec["task"] in WHOLE_PROCESS_TASKS:  # threads are set after their import
            whole = importlib.import_module("benchmarks.runners.whole")
            task = whole.TASKS.get(spec["side"], {}).get(spec["task"])
        else:
            set_threads(spec.get("threads"))
            runner = importlib.import_module(RUNNERS[spec["side"]])
            task = getattr(runner, "TASKS", {}).get(spec["task"])
        if task is None:
            raise NotAvailable(f"{spec['side']} has no runner for task '{spec['task']}'")
        metrics = task(spec, phases)
        result = {"status": "ok", "metrics": metrics}
    except NotAvailable as err:
        result = {"status": "unavailable", "reason": str(err)}
    except Exception as err:  # reported, never swallowed: the table shows it
        result = {
            "status": "error",
            "reason": f"{type(err).__name__}: {err}"[:500],
            "traceback": traceback.format_exc()[-4000:],
        }
    result["phases"] = phases.records
    result["peak_rss_mb_self"] = phases.process_peak_mb()
    write_result(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

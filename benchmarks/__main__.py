"""``python -m benchmarks``: run benchmark suites and write their tables and charts.

python -m benchmarks                       # every suite, quick size
python -m benchmarks --suite quant,gptq --size full
python -m benchmarks --list                # the suites and their cases
python -m benchmarks --suite prune --size full --model smollm2-135m   # one model's cases
python -m benchmarks --suite scale --size full  # GPTQ, layers on disk, 16M-1B (benchmarks/scale.py)
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from benchmarks.common import ROOT
from benchmarks.harness import Settings, run_case, side_python
from benchmarks.report import build_report, write_index, write_outputs
from benchmarks.suites import SIZES, SUITES


def _say(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--suite", default="all", help=f"all, any of: {', '.join(SUITES)}; or scale alone"
    )
    parser.add_argument("--size", default="quick", choices=SIZES)
    parser.add_argument("--case", default=None, help="only the cases with these names (a,b)")
    parser.add_argument("--model", default=None, help="only the cases on these models (a,b)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--repeats", type=int, default=None, help="override each case's repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every case")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case process")
    parser.add_argument("--no-peers", action="store_true", help="run our side only")
    parser.add_argument("--list", action="store_true", help="list suites and cases, run nothing")
    return parser.parse_args(argv)


# runs that are their own scripts (long; never part of "all"), with the models of each size
SCRIPTS = {"scale": {"smoke": "llama-16m", "quick": "llama-16m,llama-100m,llama-400m",
                     "full": "llama-16m,llama-100m,llama-400m,llama-1b"}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.suite == "scale":  # GPTQ with layers on disk, 16M to 1B: benchmarks/scale.py
        from benchmarks import scale

        extra = ["--models", SCRIPTS["scale"][args.size], "--out", str(args.out)]
        extra += ["--threads", str(args.threads), "--timeout", str(args.timeout)]
        extra += ["--no-peers"] * args.no_peers + ["--repeats", str(args.repeats or 1)]
        if args.size == "smoke":
            extra += ["--samples", "2", "--seq-len", "64"]
        return scale.main(extra)
    names = list(SUITES) if args.suite == "all" else [s.strip() for s in args.suite.split(",")]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        _say(f"unknown suite(s) {unknown}; known: {', '.join(SUITES)}")
        return 2
    only = {c.strip() for c in args.case.split(",")} if args.case else None
    models = {m.strip() for m in args.model.split(",")} if args.model else None
    if args.list:
        for name in names:
            _say(f"{name}: {SUITES[name].description}")
            for case in SUITES[name].cases(args.size):
                _say(f"  - {case.name} on {case.model} [{', '.join(case.sides)}]")
        return 0
    settings = Settings(
        out=args.out,
        threads=args.threads,
        repeats=args.repeats,
        peers=not args.no_peers,
        timeout=args.timeout,
    )
    for peer in ("llmcompressor", "deepspeed"):
        if args.no_peers:
            break
        if side_python(peer) is None:
            _say(f"peer {peer}: not installed (run `make bench-peers-setup`); ours runs alone")
    date = datetime.date.today().isoformat()
    for name in names:
        suite = SUITES[name]
        cases = [
            c
            for c in suite.cases(args.size)
            if (only is None or c.name in only) and (models is None or c.model in models)
        ]
        _say(f"== suite {name} ({args.size}): {len(cases)} case(s)")
        records = [run_case(case, settings, log=_say) for case in cases]
        report = build_report(name, args.size, date, records, {
            "threads": settings.threads, "repeats": settings.repeats,
            "peers": settings.peers, "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
        })  # fmt: skip
        paths = write_outputs(report, args.out, suite.description)
        _say(f"   wrote {', '.join(str(p) for p in paths.values())}")
        if report["chart"] and "png" not in paths:
            _say(f"   {report['chart']}")
    if names:
        _say(f"index: {write_index(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

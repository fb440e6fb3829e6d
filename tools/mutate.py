"""Mutation testing: plant small bugs in one module, one at a time, and see which the tests catch.

    python -m tools.mutate src/compressor/core/lifecycle.py --tests tests/core
    make mutate MODULE=src/compressor/core/lifecycle.py TESTS="tests/core"

The repository is copied to a temporary directory first (the files git knows, tracked or not
yet added, without ignored ones; a ``shared`` folder beside the repository is linked beside the
copy, as the tests look for it there), and every mutant is written into that copy, so the
working tree is never touched, whatever happens to this run (Ctrl-C included). For each mutant
the given tests run in a fresh ``pytest -x`` process, forked from a worker that has imported
torch and the other heavy libraries once (``mutate_worker.py``), with the copy's ``src`` first
on the path and no bytecode written (a stale ``.pyc`` would hide a mutant). A mutant is *caught* when the
tests fail or run past the per-mutant timeout, *survived* when they pass. The sites and the
operators are listed in ``mutants.py``.

The report (one line per mutant: status, file:line, operator, code before and after) goes to
``--report``; a summary is logged.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from tqdm import tqdm

from tools.mutants import Site, find_sites, mutant_source
from tools.mutate_worker import DEFAULT_PRELOAD, SURVIVED, TIMEOUT, PytestWorker

__all__ = ["Outcome", "choose_sites", "format_report", "main", "run_mutations"]

_SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


@dataclass(frozen=True)
class Outcome:
    """What the tests did with one mutant.

    :param site: the mutant
    :param status: ``caught`` (a test failed), ``timeout`` (counted as caught) or ``survived``
    :param seconds: how long the tests ran
    :param caught_by: the first test that failed (pytest's node id), when one did
    """

    site: Site
    status: str
    seconds: float
    caught_by: str = ""

    @property
    def caught(self) -> bool:
        return self.status != SURVIVED


def _tree_files(root: Path) -> list[Path]:
    """The repository's files as git sees them (tracked, or untracked and not ignored); every
    file outside the usual caches when ``root`` is not a git work tree."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return [
            path.relative_to(root)
            for path in root.rglob("*")
            if path.is_file() and not _SKIP_DIRS.intersection(path.relative_to(root).parts)
        ]
    return [Path(name) for name in listed.decode().split("\0") if name]


@contextmanager
def _copy_of(root: Path) -> Iterator[Path]:
    """A throwaway copy of the repository at ``root``, removed afterwards."""
    holder = Path(tempfile.mkdtemp(prefix="compressor-mutate-"))
    try:
        copy = holder / root.name
        for relative in _tree_files(root):
            source = root / relative
            if not source.is_file():  # deleted but still tracked
                continue
            (copy / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / relative)
        shared = root.parent / "shared"
        if shared.is_dir():
            (holder / "shared").symlink_to(shared.resolve(), target_is_directory=True)
        yield copy
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _check_imports_copy(copy: Path, module: Path) -> None:
    """Fail when the tests would import the package from somewhere else (an installed copy),
    which would make every mutant survive."""
    if module.parts[0] != "src" or len(module.parts) < 3:
        return
    package = module.parts[1]
    env = dict(os.environ, PYTHONPATH=str(copy / "src"), PYTHONDONTWRITEBYTECODE="1")
    found = subprocess.run(
        [sys.executable, "-c", f"import {package}; print({package}.__file__)"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not found or not Path(found).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(
            f"the tests would import {package} from {found or 'nowhere'}, not from the copy "
            f"{copy}: mutants there would go unseen"
        )


def choose_sites(
    count: int, max_mutants: int | None, seed: int, only: Sequence[int] | None = None
) -> list[int]:
    """The sites to test, in source order: all of them, or ``max_mutants`` drawn with
    ``seed`` (the same seed draws the same sample of the same module), or those in ``only``
    (the survivors of an earlier run, say)."""
    if only is not None:
        wrong = sorted(i for i in set(only) if not 0 <= i < count)
        if wrong:
            raise ValueError(f"sites {wrong} do not exist: the module has sites 0 to {count - 1}")
        return sorted(set(only))
    if max_mutants is None or max_mutants >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), max_mutants))


def run_mutations(
    root: Path,
    module: Path,
    tests: Sequence[str],
    *,
    max_mutants: int | None = None,
    seed: int = 0,
    timeout: float | None = None,
    preload: str = DEFAULT_PRELOAD,
    only: Sequence[int] | None = None,
) -> list[Outcome]:
    """Plant each mutant of ``module`` in a copy of ``root`` and run ``tests`` on it.

    :param root: the repository (only read)
    :param module: the module to mutate, relative to ``root``
    :param tests: test paths (and pytest selectors), relative to ``root``
    :param max_mutants: test at most this many, sampled with ``seed``; all when None
    :param seed: the sampling seed
    :param timeout: seconds per mutant; when None, 3x the unmutated run plus 10 s
    :param preload: modules (comma separated) the test worker imports once, before any mutant
    :param only: test just these sites (their numbers in the report), e.g. the survivors of
        an earlier run after new tests were written
    :return: one outcome per mutant tested, in source order
    """
    source = (root / module).read_text(encoding="utf-8")
    sites = find_sites(source)
    chosen = choose_sites(len(sites), max_mutants, seed, only)
    if only is not None:
        logger.info("{}: {} sites, testing the {} given", module, len(sites), len(chosen))
    elif len(chosen) < len(sites):
        logger.info(
            "{}: {} sites, testing {} sampled (seed {})", module, len(sites), max_mutants, seed
        )
    else:
        logger.info("{}: {} sites", module, len(sites))
    outcomes = []
    with _copy_of(root) as copy:
        target = copy / module
        _check_imports_copy(copy, module)
        worker = PytestWorker(copy, tests, preload)
        try:
            status, baseline, failed = worker.run(timeout=3600)
            if status != SURVIVED:
                raise RuntimeError(
                    f"the tests {' '.join(tests)} do not pass on the unmutated code ({status}"
                    f"{': ' + failed if failed else ''}); fix them before mutating"
                )
            per_mutant = timeout or 3 * baseline + 10
            logger.info(
                "unmutated run: {:.1f} s; timeout per mutant {:.0f} s", baseline, per_mutant
            )
            for index in tqdm(chosen, desc=f"mutating {module.name}", unit="mutant"):
                mutated, site = mutant_source(source, index)
                target.write_text(mutated, encoding="utf-8")
                try:
                    status, seconds, failed = worker.run(per_mutant)
                finally:
                    target.write_text(source, encoding="utf-8")
                outcomes.append(Outcome(site, status, seconds, failed))
        finally:
            worker.close()
    return outcomes


def format_report(module: Path, tests: Sequence[str], outcomes: Sequence[Outcome]) -> str:
    caught = sum(o.caught for o in outcomes)
    lines = [
        f"# Mutation testing: {module}",
        f"tests: {' '.join(tests)}",
        f"mutants caught: {caught}/{len(outcomes)}"
        + (f" ({100 * caught / len(outcomes):.0f}%)" if outcomes else ""),
        "",
    ]
    for outcome in sorted(outcomes, key=lambda o: (o.caught, o.site.index)):
        site = outcome.site
        lines.append(
            f"{outcome.status:<8} #{site.index:<3} {module}:{site.line}:{site.column} "
            f"[{site.operator}] "
            f"{site.before}  ->  {site.after}"
            + (f"  (by {outcome.caught_by})" if outcome.caught_by else "")
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", type=Path, help="the module to mutate, e.g. src/pkg/mod.py")
    parser.add_argument(
        "--tests", nargs="+", required=True, help="test files or folders to run on each mutant"
    )
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository root")
    parser.add_argument("--max-mutants", type=int, default=None, help="sample this many")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed")
    parser.add_argument(
        "--sites",
        default=None,
        help="only these sites, comma separated (the #numbers of a report's survivors)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per mutant")
    parser.add_argument("--report", type=Path, default=None, help="where the report goes")
    parser.add_argument(
        "--preload", default=DEFAULT_PRELOAD, help="modules the test worker imports once"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    module = args.module.resolve().relative_to(root) if args.module.is_absolute() else args.module
    if not (root / module).is_file():
        parser.error(f"module {args.module}: no such file under {root}")
    if args.max_mutants is not None and args.max_mutants <= 0:
        parser.error(f"--max-mutants must be a positive int, got {args.max_mutants}")
    tests = [t for spec in args.tests for t in spec.split()]
    only = None
    if args.sites is not None:
        try:
            only = [int(part) for part in args.sites.replace(",", " ").split()]
        except ValueError:
            parser.error(f"--sites takes site numbers separated by commas, got {args.sites!r}")
    # a terminated run (kill, a CI timeout) unwinds like Ctrl-C: the worker and the copy go
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    outcomes = run_mutations(
        root,
        module,
        tests,
        max_mutants=args.max_mutants,
        seed=args.seed,
        timeout=args.timeout,
        preload=args.preload,
        only=only,
    )
    report = args.report or root / ".mutation" / (
        module.with_suffix("").as_posix().replace("/", ".") + ".txt"
    )
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(format_report(module, tests, outcomes), encoding="utf-8")
    caught = sum(o.caught for o in outcomes)
    logger.info(
        "{}: caught {}/{} mutants ({} by timeout), {} survived; report: {}",
        module,
        caught,
        len(outcomes),
        sum(o.status == TIMEOUT for o in outcomes),
        len(outcomes) - caught,
        report,
    )
    for outcome in outcomes:
        if not outcome.caught:
            logger.info(
                "survived: {}:{}:{} {}  ->  {}",
                module,
                outcome.site.line,
                outcome.site.column,
                outcome.site.before,
                outcome.site.after,
            )
    survivors = [str(o.site.index) for o in outcomes if not o.caught]
    if survivors:
        logger.info("to test only the survivors again: --sites {}", ",".join(survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The mutation-testing tool on a throwaway package: a mutant the tests see is caught, one they
cannot see survives, an endless loop is stopped by the timeout, and the tree is left as it
was, also when the run is interrupted."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.mutants import find_sites, mutant_source  # noqa: E402

from tools import mutate  # noqa: E402

MODULE = '''"""A module to plant bugs in."""


def double(x):
    return x * 2


def count_to(n):
    i = 0
    while i < n:
        i += 1
    return i


def untested():
    return 1
'''

TESTS = """from tinypkg.calc import count_to, double


def test_double():
    assert double(3) == 6


def test_count_to():
    assert count_to(3) == 3
"""


@pytest.fixture
def tiny_repo(tmp_path, monkeypatch):
    """A git work tree holding src/tinypkg/calc.py and its test, committed; temporary
    directories of the run go to their own folder, which the test can inspect."""
    repo = tmp_path / "repo"
    (repo / "src" / "tinypkg").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "src" / "tinypkg" / "__init__.py").write_text("")
    (repo / "src" / "tinypkg" / "calc.py").write_text(MODULE)
    (repo / "tests" / "test_calc.py").write_text(TESTS)
    if shutil.which("git"):
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
        subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
        subprocess.run([*git, "commit", "-q", "-m", "tiny"], cwd=repo, check=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return repo


def _line_of(text: str) -> int:
    return next(n for n, line in enumerate(MODULE.splitlines(), 1) if text in line)


def test_sites_are_numbered_in_source_order_and_each_plants_one_change():
    sites = find_sites(MODULE)
    assert [s.index for s in sites] == list(range(len(sites)))
    assert [s.line for s in sites] == sorted(s.line for s in sites)
    assert find_sites(MODULE) == sites  # the same source gives the same list
    operators = {(s.line, s.operator) for s in sites}
    assert (_line_of("x * 2"), "arith") in operators
    assert (_line_of("while i < n"), "compare") in operators
    assert (_line_of("while i < n"), "negate") in operators
    assert (_line_of("i += 1"), "delete") in operators
    # the docstring is not a site
    assert all(s.line != 1 for s in sites)
    for site in sites:
        mutated, applied = mutant_source(MODULE, site.index)
        assert applied == site
        assert mutated.replace(" ", "") != MODULE.replace(" ", "")
        compile(mutated, "calc.py", "exec")


def test_caught_survived_and_timeout_reported_and_tree_restored(tiny_repo, tmp_path):
    report = tmp_path / "report.txt"
    module = Path("src/tinypkg/calc.py")
    code = mutate.main(
        [
            str(module),
            "--tests",
            "tests/test_calc.py",
            "--root",
            str(tiny_repo),
            "--timeout",
            "8",
            "--preload",
            "",
            "--report",
            str(report),
        ]
    )
    assert code == 0
    text = report.read_text()
    lines = text.splitlines()
    total = len(find_sites(MODULE))
    caught_lines = [line for line in lines if line.startswith(("caught", "timeout"))]
    survived_lines = [line for line in lines if line.startswith("survived")]
    assert len(caught_lines) + len(survived_lines) == total
    assert lines[2].startswith(f"mutants caught: {len(caught_lines)}/{total} (")

    def status_of(line_text: str, operator: str) -> str:
        prefix = f"{module}:{_line_of(line_text)}:"
        (hit,) = [line for line in lines if prefix in line and f"[{operator}]" in line]
        return hit.split()[0]

    # observable by test_double: x * 2 -> x / 2
    assert status_of("x * 2", "arith") == "caught"
    (arith,) = [line for line in lines if "[arith]" in line and "x * 2" in line]
    assert arith.endswith("(by tests/test_calc.py::test_double)")
    # nothing calls untested(): returning None instead of 1 cannot be seen
    assert status_of("return 1", "return") == "survived"
    # deleting the loop's increment never ends: stopped by the timeout, counted as caught
    assert status_of("i += 1", "delete") == "timeout"
    assert (tiny_repo / module).read_text() == MODULE
    if shutil.which("git"):
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=tiny_repo, capture_output=True, text=True
        )
        assert status.stdout == ""
    assert list((tmp_path / "scratch").iterdir()) == []  # the copy is gone


def test_an_interrupted_run_leaves_the_tree_as_it_was(tiny_repo, tmp_path, monkeypatch):
    module = Path("src/tinypkg/calc.py")
    planted = []
    real = mutate.mutant_source

    def interrupt_on_second(source, index):
        if planted:
            raise KeyboardInterrupt
        planted.append(index)
        return real(source, index)

    monkeypatch.setattr(mutate, "mutant_source", interrupt_on_second)
    with pytest.raises(KeyboardInterrupt):
        mutate.run_mutations(tiny_repo, module, ["tests/test_calc.py"], timeout=8, preload="")
    assert planted == [0]
    assert (tiny_repo / module).read_text() == MODULE
    assert list((tmp_path / "scratch").iterdir()) == []


def test_the_sample_is_fixed_by_the_seed():
    chosen = mutate.choose_sites(40, max_mutants=6, seed=3)
    assert len(chosen) == 6 and chosen == sorted(chosen) and len(set(chosen)) == 6
    assert chosen == mutate.choose_sites(40, max_mutants=6, seed=3)
    assert chosen != mutate.choose_sites(40, max_mutants=6, seed=4)
    assert mutate.choose_sites(5, max_mutants=6, seed=3) == [0, 1, 2, 3, 4]
    assert mutate.choose_sites(5, max_mutants=None, seed=3) == [0, 1, 2, 3, 4]
    # the survivors of an earlier run, given by number: exactly those
    assert mutate.choose_sites(40, max_mutants=6, seed=3, only=[9, 2, 9]) == [2, 9]
    with pytest.raises(ValueError, match=r"sites \[40\] do not exist"):
        mutate.choose_sites(40, max_mutants=None, seed=0, only=[40])


def test_refuses_tests_that_fail_before_any_mutant(tiny_repo):
    (tiny_repo / "tests" / "test_calc.py").write_text(TESTS.replace("== 6", "== 7"))
    with pytest.raises(RuntimeError, match="do not pass on the unmutated code"):
        mutate.run_mutations(
            tiny_repo, Path("src/tinypkg/calc.py"), ["tests/test_calc.py"], preload=""
        )

"""The test runner of ``mutate.py``: imports the heavy libraries once, then forks a fresh
pytest for every mutant, so a mutant costs its tests and not another import of torch. Both
ends are here: ``main`` runs in the repository copy, ``PytestWorker`` drives it from ``mutate.py``.

Run in the repository copy, with its ``src`` on the path; the package under test is never
imported here (only in the forked children), so each child imports the mutated module afresh.
Protocol, one line each: ``mutate.py`` writes ``run``; the worker answers ``pid <pid>`` when
the child starts (its own process group, which ``mutate.py`` kills on a timeout) and
``exit <code> <first failing test as a JSON string, "" when none>`` when it ends. End of input ends the worker.

    python mutate_worker.py <preload modules, comma separated> <pytest arguments...>
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from loguru import logger

__all__ = ["CAUGHT", "DEFAULT_PRELOAD", "SURVIVED", "TIMEOUT", "PytestWorker"]

CAUGHT, TIMEOUT, SURVIVED = "caught", "timeout", "survived"


def _preload(names: str) -> None:
    for name in filter(None, names.split(",")):
        # a library missing here is simply not preloaded (the tests import what they need)
        with suppress(Exception):
            importlib.import_module(name)


class _FirstFailure:
    """A pytest plugin that writes the id of the first failing test to a pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = False

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed and not self.written:
            os.write(self.fd, report.nodeid.encode()[:4000])
            self.written = True


def _child(pytest_args: list[str], fd: int) -> None:
    os.setpgid(0, 0)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    code = 3
    try:
        import pytest

        code = int(pytest.main(pytest_args, plugins=[_FirstFailure(fd)]))
    finally:
        os._exit(code)


# imported once by the worker, before any mutant: what the tests of this project load anyway
DEFAULT_PRELOAD = (
    "torch,transformers,transformers.models.llama.modeling_llama,compressed_tensors,"
    "pydantic,yaml,loguru,tqdm,accelerate,hypothesis,numpy"
)


class PytestWorker:
    """The other end: starts this script in the repository copy and asks it for runs.

    :param copy: the repository copy (its ``src`` goes first on the path)
    :param tests: the pytest arguments (test paths)
    :param preload: modules to import once, comma separated
    """

    def __init__(self, copy: Path, tests: Sequence[str], preload: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(copy / "src"), str(copy)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        worker = Path(__file__).resolve()
        args = ["-x", "-q", "-p", "no:cacheprovider", *tests]
        self._process = subprocess.Popen(
            [sys.executable, str(worker), preload, *args],
            cwd=copy,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._child: int | None = None

    def _read(self, timeout: float | None) -> str | None:
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], timeout)
        if not ready:
            return None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the test worker ended (exit {self._process.wait()})")
        return line.strip()

    def run(self, timeout: float) -> tuple[str, float, str]:
        """Run the tests once on the copy as it is now: (status, seconds, the first failing
        test or "")."""
        assert self._process.stdin is not None
        start = time.monotonic()
        self._process.stdin.write("run\n")
        self._process.stdin.flush()
        started = self._read(timeout=600)
        if started is None or not started.startswith("pid "):
            raise RuntimeError(f"the test worker did not start a run: {started!r}")
        self._child = int(started.split()[1])
        finished = self._read(timeout=timeout)
        if finished is None:
            self._kill_child()
            self._read(timeout=60)  # the worker reports the killed child
            return TIMEOUT, time.monotonic() - start, ""
        self._child = None
        _, code_text, failed_json = finished.split(maxsplit=2)
        code, failed = int(code_text), json.loads(failed_json)
        if code not in (0, 1):  # 2-5: interrupted, internal error, usage, no tests collected
            logger.debug("pytest exited {} on a mutant", code)
        status = SURVIVED if code == 0 else CAUGHT
        return status, time.monotonic() - start, failed

    def _kill_child(self) -> None:
        if self._child is not None:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(self._child, signal.SIGKILL)
            self._child = None

    def close(self) -> None:
        self._kill_child()
        with suppress(OSError):
            assert self._process.stdin is not None
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def main() -> None:
    sys.dont_write_bytecode = True
    _preload(sys.argv[1])
    pytest_args = sys.argv[2:]
    import pytest  # noqa: F401  (loaded once, with its plugins)

    for line in sys.stdin:
        if line.strip() != "run":
            continue
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _child(pytest_args, write_end)
        os.close(write_end)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as pipe:
            failed = pipe.read().decode(errors="replace")
        # JSON: a test id may hold spaces or newlines (pytest's parametrize ids)
        print(f"exit {os.waitstatus_to_exitcode(status)} {json.dumps(failed)}", flush=True)


if __name__ == "__main__":
    main()

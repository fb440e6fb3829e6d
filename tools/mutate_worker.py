"""The test runner of ``mutate.py``: imports the heavy libraries once, then forks a fresh
pytest for every mutant, so a mutant costs its tests and not another import of torch.

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
import sys
from contextlib import suppress


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

"""The atomic swap of a checkpoint directory, and recovery from a save that was killed.

A save writes into a *partial* directory beside the target and renames it into place. When a
checkpoint is being replaced, the old one is first renamed aside to a *previous* directory,
then the partial takes its name, then the previous one is removed. Both names carry the host
and process id of the save, ``.<name>.partial-<host>-<pid>-<token>`` and
``.<name>.previous-<host>-<pid>-<token>``, beside the target, so a later run can tell the
leftovers of a killed save (its process is gone) from those of a save still running.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path

from loguru import logger

__all__ = ["make_partial_dir", "recover_interrupted_saves", "swap_into_place"]

PARTIAL = "partial"
PREVIOUS = "previous"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _sibling(target: Path, kind: str) -> Path:
    name = f".{target.name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    return target.with_name(name)


def make_partial_dir(target: Path) -> Path:
    """A new, empty directory beside ``target`` for a save to write into.

    It is created with the process's umask (as ``mkdir`` would), or with the mode of
    ``target`` when that exists (the checkpoint being replaced keeps its permissions).

    :param target: the checkpoint directory the save will become
    :return: the partial directory
    """
    partial = _sibling(target, PARTIAL)
    os.mkdir(partial)
    if target.is_dir():
        os.chmod(partial, stat.S_IMODE(target.stat().st_mode))
    return partial


def swap_into_place(partial: Path, target: Path) -> None:
    """Rename ``partial`` to ``target``; an existing ``target`` is moved aside first and
    removed once the new one is in place.

    If the process dies between the two renames, the old checkpoint is at
    ``.<name>.previous-<host>-<pid>-<token>`` beside ``target``, and the next run restores it
    (``recover_interrupted_saves``). A failed second rename puts it back at once.
    """
    if not target.exists():
        # fails (rather than merging) if another process created a non-empty target
        os.rename(partial, target)
        return
    previous = _sibling(target, PREVIOUS)
    os.rename(target, previous)
    try:
        os.rename(partial, target)
    except BaseException:
        os.rename(previous, target)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def recover_interrupted_saves(target: Path) -> None:
    """Clean up after saves of ``target`` that were killed (their process no longer runs).

    A killed save's partial directory is removed. A checkpoint it had moved aside is renamed
    back to ``target`` when ``target`` is missing (the save died between its two renames),
    else removed (the new checkpoint was already in place). Each step is logged. Leftovers of
    saves on other hosts, or still running here, are left alone.

    :param target: the checkpoint directory
    """
    parent = target.parent
    if not parent.is_dir():
        return
    pattern = re.compile(
        rf"^\.{re.escape(target.name)}\.(?P<kind>{PARTIAL}|{PREVIOUS})-"
        r"(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]+$"
    )
    for entry in sorted(parent.iterdir()):
        found = pattern.match(entry.name)
        if found is None or not entry.is_dir() or entry.is_symlink():
            continue
        if found["host"] != _host() or _running(int(found["pid"])):
            continue
        if found["kind"] == PREVIOUS and not target.exists() and not target.is_symlink():
            os.rename(entry, target)
            logger.warning(
                "restored {} from {}: a save that was replacing it was killed between moving "
                "it aside and moving the new checkpoint in",
                target,
                entry.name,
            )
            continue
        shutil.rmtree(entry, ignore_errors=True)
        what = "unfinished checkpoint" if found["kind"] == PARTIAL else "superseded checkpoint"
        logger.info("removed {} {} left by a save that was killed", what, entry)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True

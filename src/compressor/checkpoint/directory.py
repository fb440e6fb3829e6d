"""Atomic checkpoints: written beside the target, then renamed into place.

A failed run never leaves a half-written checkpoint, and an existing directory is replaced
only when ``overwrite`` is set and it is a checkpoint or empty.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict

from compressor.checkpoint.compressed import RECIPE_FILE, write_compressed
from compressor.checkpoint.model_card import MODEL_CARD_FILE, is_model_card, model_card
from compressor.checkpoint.sparsity import WeightZeros
from compressor.checkpoint.swap import (
    make_partial_dir,
    recover_interrupted_saves,
    swap_into_place,
)
from compressor.recipe import Recipe

__all__ = [
    "OutputArguments",
    "check_output_dir",
    "is_checkpoint",
    "output_target",
    "save_checkpoint",
]


class OutputArguments(BaseModel):
    """Where and how the compressed checkpoint is written.

    :param output_dir: the checkpoint directory; unset means nothing is saved
    :param save_compressed: write the compressed (packed) format rather than dense weights
    :param overwrite: replace an existing ``output_dir`` that is a checkpoint or empty
        (otherwise that is an error)
    :param decompress_after_save: give a quantized model its weights back after writing
        (``save_compressed``'s ``decompress``); False when nothing uses the model afterwards
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_dir: Path | None = None
    save_compressed: bool = True
    overwrite: bool = False
    decompress_after_save: bool = True


def output_target(output_dir: str | Path) -> Path:
    """Where a checkpoint for ``output_dir`` is written: ``output_dir`` itself, or the directory
    it links to when it is a symbolic link (written through, so the link stays a link)."""
    output_dir = Path(output_dir)
    return Path(os.path.realpath(output_dir)) if output_dir.is_symlink() else output_dir


def is_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint, which ``overwrite`` may replace.

    A checkpoint is a directory with a ``config.json`` (a transformers model) or with what
    ``save_checkpoint`` writes beside the model: a ``recipe.yaml`` or a ``README.md`` model card
    of ours.

    :param directory: an existing directory
    :return: True when it is one
    """
    if (directory / "config.json").is_file() or (directory / RECIPE_FILE).is_file():
        return True
    card = directory / MODEL_CARD_FILE
    return card.is_file() and is_model_card(card.read_text(encoding="utf-8", errors="replace"))


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Fail early when a checkpoint cannot be written to ``output_dir``.

    Leftovers of a killed save of the same directory are cleaned up first (see
    ``recover_interrupted_saves``). Then: an existing ``output_dir`` is refused without
    ``overwrite``, and with it unless it is empty or a checkpoint (``is_checkpoint``); the
    location must be writable.

    :param output_dir: the checkpoint directory (a symbolic link is followed)
    :param overwrite: whether an existing checkpoint may be replaced
    """
    target = output_target(output_dir)
    recover_interrupted_saves(target)
    if target.exists():
        _check_replaceable(Path(output_dir), target, overwrite)
    _check_writable(Path(output_dir), target.parent)


def _check_replaceable(output_dir: Path, target: Path, overwrite: bool) -> None:
    if not target.is_dir():
        raise FileExistsError(f"output_dir {output_dir} exists and is not a directory")
    if not overwrite:
        raise FileExistsError(
            f"output_dir {output_dir} already exists; pass overwrite=True (CLI: --overwrite) "
            "to replace it"
        )
    entries = sorted(entry.name for entry in target.iterdir())
    if entries and not is_checkpoint(target):
        shown = ", ".join(entries[:5]) + (
            f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        )
        raise FileExistsError(
            f"output_dir {output_dir} holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} "
            f"({shown}) and is not a checkpoint (no config.json, {RECIPE_FILE} or model card): "
            "overwrite replaces only a checkpoint or an empty directory; choose another "
            "output_dir or empty this one yourself"
        )


def _check_writable(output_dir: Path, parent: Path) -> None:
    """Create and remove a directory where the checkpoint will be written (the nearest part
    of ``parent`` that exists), which is what the save does."""
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(
            f"output_dir {output_dir}: {existing} is a file, so no directory can be created "
            "under it; choose another output_dir"
        )
    try:
        probe = tempfile.mkdtemp(prefix=".compressor-write-check-", dir=existing)
    except OSError as err:
        raise PermissionError(
            f"output_dir {output_dir}: cannot write in {existing} ({err.strerror}); choose a "
            "location you can write to"
        ) from err
    os.rmdir(probe)


def save_checkpoint(
    model: torch.nn.Module,
    output_dir: str | Path,
    recipe: Recipe,
    tokenizer: Any = None,
    *,
    save_compressed: bool = True,
    overwrite: bool = False,
    decompress: bool = True,
) -> Path:
    """Write model, tokenizer, ``recipe.yaml`` and a ``README.md`` model card to ``output_dir``
    atomically.

    Everything goes into a partial directory beside ``output_dir`` first (created with the
    umask, or with the mode of the checkpoint it replaces), which is renamed into place only
    when complete. With ``overwrite``, an existing checkpoint (``is_checkpoint``) or empty
    directory is swapped out and removed only after the new one is in place; anything else is
    refused. A symbolic link ``output_dir`` is written through. See ``checkpoint.swap`` for
    what a killed save leaves and how the next run recovers it.

    :param model: the (compressed) model
    :param output_dir: the checkpoint directory
    :param recipe: the recipe that produced it, saved as ``recipe.yaml``
    :param tokenizer: saved beside the model when given
    :param save_compressed: write the compressed format rather than dense weights
    :param overwrite: replace an existing checkpoint at ``output_dir``
    :param decompress: give a quantized model its weights back after writing (see
        ``save_compressed``); False for a caller that does not use the model afterwards
    :return: the checkpoint directory
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    target = output_target(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = make_partial_dir(target)
    try:
        _write(model, partial, recipe, tokenizer, save_compressed, decompress)
        if target.exists():  # another process may have created it meanwhile
            _check_replaceable(output_dir, target, overwrite)
        swap_into_place(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("saved checkpoint to {}", output_dir)
    return output_dir


def _write(
    model: torch.nn.Module,
    directory: Path,
    recipe: Recipe,
    tokenizer: Any,
    compressed: bool,
    decompress: bool,
) -> None:
    # the card describes the zeros the compressed save counted (the weights are read once)
    zeros = _save_model(model, directory, compressed, decompress)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    recipe.save(directory / RECIPE_FILE)
    card = model_card(model, recipe, zeros)
    (directory / MODEL_CARD_FILE).write_text(card, encoding="utf-8")


def _save_model(
    model: Any, directory: Path, compressed: bool, decompress: bool
) -> dict[str, WeightZeros] | None:
    """Write the weights and config; return the zeros a compressed save counted."""
    if compressed:
        return write_compressed(model, directory, decompress=decompress)
    # the class's own method: a quantizing run makes the instance's save compressed
    type(model).save_pretrained(model, directory)
    return None

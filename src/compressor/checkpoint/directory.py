"""Atomic checkpoints: written beside the target, then renamed into place.

A failed run never leaves a half-written checkpoint, and an existing directory is replaced
only when ``overwrite`` is set.
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

from compressor.checkpoint.compressed import RECIPE_FILE
from compressor.checkpoint.compressed import save_compressed as write_compressed
from compressor.checkpoint.model_card import MODEL_CARD_FILE, model_card
from compressor.recipe import Recipe

__all__ = ["OutputArguments", "check_output_dir", "save_checkpoint"]


class OutputArguments(BaseModel):
    """Where and how the compressed checkpoint is written.

    :param output_dir: the checkpoint directory; unset means nothing is saved
    :param save_compressed: write the compressed (packed) format rather than dense weights
    :param overwrite: replace an existing ``output_dir`` (otherwise that is an error)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_dir: Path | None = None
    save_compressed: bool = True
    overwrite: bool = False


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Fail early when ``output_dir`` exists and may not be replaced."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {output_dir} exists and is not a directory")
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"output_dir {output_dir} already exists; pass overwrite=True (CLI: --overwrite) "
            "to replace it"
        )


def save_checkpoint(
    model: torch.nn.Module,
    output_dir: str | Path,
    recipe: Recipe,
    tokenizer: Any = None,
    *,
    save_compressed: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write model, tokenizer, ``recipe.yaml`` and a ``README.md`` model card to ``output_dir``
    atomically.

    Everything goes into a temporary directory beside ``output_dir`` first, which is renamed
    into place only when complete. With ``overwrite``, an existing directory is swapped out
    and removed only after the new one is in place.

    :param model: the (compressed) model
    :param output_dir: the checkpoint directory
    :param recipe: the recipe that produced it, saved as ``recipe.yaml``
    :param tokenizer: saved beside the model when given
    :param save_compressed: write the compressed format rather than dense weights
    :param overwrite: replace an existing ``output_dir``
    :return: the checkpoint directory
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        _write(model, partial, recipe, tokenizer, save_compressed)
        _swap_into_place(partial, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("saved checkpoint to {}", output_dir)
    return output_dir


def _write(
    model: torch.nn.Module, directory: Path, recipe: Recipe, tokenizer: Any, compressed: bool
) -> None:
    _save_model(model, directory, compressed)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    recipe.save(directory / RECIPE_FILE)
    (directory / MODEL_CARD_FILE).write_text(model_card(model, recipe), encoding="utf-8")


def _save_model(model: Any, directory: Path, compressed: bool) -> None:
    if compressed:
        write_compressed(model, directory)
    else:
        # the class's own method: a quantizing run makes the instance's save compressed
        type(model).save_pretrained(model, directory)


def _swap_into_place(partial: Path, output_dir: Path, overwrite: bool) -> None:
    if not output_dir.exists():
        # fails (rather than merging) if another process created a non-empty output_dir
        os.rename(partial, output_dir)
        return
    check_output_dir(output_dir, overwrite)
    retired = partial.with_name(partial.name + ".old")
    os.rename(output_dir, retired)
    try:
        os.rename(partial, output_dir)
    except BaseException:
        os.rename(retired, output_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)

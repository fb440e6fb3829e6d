"""``oneshot`` under a process group (``torchrun``, ``accelerate launch``): what every rank must
agree on before any work, each rank's share of the calibration batches, and the one rank
that saves.

Each rank calibrates on a contiguous share of the calibration batches (each batch used by
exactly one rank); the modifiers reduce every statistic they gather over the ranks
(``CalibrationTraits.reduces_across_ranks``) and share out their per-module solves, so
every rank ends with the same compressed model. See docs/distributed.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.offload.utils import as_single_threaded
from loguru import logger

from compressor.calibration.arguments import CalibrationArguments
from compressor.calibration.data import Batch
from compressor.checkpoint.directory import OutputArguments, save_checkpoint
from compressor.recipe import Recipe, RecipeError, resolve_recipe
from compressor.utils import distributed
from compressor.utils.sharding import has_sharded_parameters

__all__ = [
    "check_model_agreement",
    "check_recipe_for_ranks",
    "on_first_rank",
    "rank_offload_folder",
    "save_checkpoint_once",
    "share_batches",
]


def check_recipe_for_ranks(
    recipe: Recipe,
    calibration: CalibrationArguments,
    output: OutputArguments,
    model: Any,
) -> None:
    """Under a process group, before anything is loaded: refuse what cannot run on several
    ranks, and make sure every rank was given the same recipe and options. Nothing in one
    process.

    :raises RecipeError: a modifier that needs calibration data and cannot reduce its
        statistics over the ranks (``CalibrationTraits.reduces_across_ranks``), named
    :raises ValueError: ranks given different recipes, options or models (by path or id)
    """
    if not distributed.is_distributed():
        return
    unreduced = [
        type(m).__name__
        for m in recipe.modifiers
        if m.requires_calibration_data() and not m.calibration_traits().reduces_across_ranks
    ]
    if unreduced:
        raise RecipeError(
            f"{', '.join(unreduced)}: oneshot runs under a process group of "
            f"{distributed.world_size()} ranks, each calibrating on its share of the data, but "
            "these modifiers gather calibration statistics that are not reduced over the ranks "
            "(a moving-average observer cannot be: it depends on batch order; nor can "
            "AWQModifier's apply_clip search), so each rank would compress differently. Run "
            "this recipe in one process, or use minmax observers and apply_clip: false"
        )
    distributed.check_agreement("the recipe", recipe.to_yaml())
    options = {
        "calibration": calibration.model_dump(mode="json"),
        "output": output.model_dump(mode="json"),
    }
    distributed.check_agreement("the oneshot options", json.dumps(options, sort_keys=True))
    if isinstance(model, str | Path):
        distributed.check_agreement("the model path or id", str(model))


def rank_offload_folder(offload_folder: str | Path | None) -> Path | None:
    """Where this rank offloads the layers of the model it loads: under a process group its
    own folder in ``offload_folder`` (``rank0``, ``rank1``, ...), since every rank holds a
    whole model and rewrites its offloaded layers with their compressed values; in one
    process ``offload_folder`` itself."""
    if offload_folder is None or not distributed.is_distributed():
        return None if offload_folder is None else Path(offload_folder)
    return Path(offload_folder) / f"rank{distributed.rank()}"


def check_model_agreement(model: torch.nn.Module, batches: list[Batch]) -> None:
    """Under a process group, after loading and before any work: every rank must hold the same
    model (its config, and every parameter's name, shape and dtype) and the same calibration
    batches (their bytes), or the shares would not add up to one run. Nothing in one process.

    :raises ValueError: naming what the ranks disagree on
    """
    if not distributed.is_distributed():
        return
    config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    described = {
        "config": to_json(use_diff=False) if callable(to_json) else None,
        "parameters": [(n, list(p.shape), str(p.dtype)) for n, p in model.named_parameters()],
    }
    distributed.check_agreement("the model", json.dumps(described, sort_keys=True, default=str))
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                raw = value.detach().cpu().contiguous().view(-1).view(torch.uint8)
                digest.update(bytes(raw.numpy()))
    distributed.check_agreement("the calibration batches", digest.hexdigest())


def share_batches(batches: list[Batch]) -> list[Batch]:
    """This rank's contiguous share of ``batches`` (``distributed.share_of``); all of them in
    one process. Splitting whole batches keeps each batch (its padding too) what one process
    would run.

    :raises ValueError: fewer batches than ranks (a rank would calibrate on nothing)
    """
    if not distributed.is_distributed():
        return batches
    world = distributed.world_size()
    if len(batches) < world:
        raise ValueError(
            f"{len(batches)} calibration batch(es) for {world} ranks: each rank needs at least "
            "one; raise num_calibration_samples or lower batch_size"
        )
    mine = distributed.share_of(batches)
    logger.info(
        "rank {} of {}: calibrating on {} of {} batches",
        distributed.rank(),
        world,
        len(mine),
        len(batches),
    )
    return mine


def on_first_rank(what: str, action: Callable[[], None]) -> None:
    """Run ``action`` on rank 0 only, while the other ranks wait; every rank raises if it
    failed. For what touches the file system once for all ranks: the output directory's check
    (which may clean up an interrupted save) and the checkpoint's atomic write. In one
    process, just ``action()``.

    :param what: what the action does, for the other ranks' error
    """
    if not distributed.is_distributed():
        action()
        return
    error: BaseException | None = None
    if distributed.rank() == 0:
        try:
            # rank 0 acts alone: compressed-tensors, which shares its own work (compressing
            # the weights for saving) over an initialised process group, is told so
            with as_single_threaded():
                action()
        except BaseException as caught:  # told to the other ranks, then raised
            error = caught
    # every rank waits here for rank 0's outcome
    outcome = distributed.all_gather_object(None if error is None else repr(error))[0]
    if error is not None:
        raise error
    if outcome is not None:
        raise RuntimeError(f"rank 0 failed to {what}: {outcome}")


def save_checkpoint_once(
    model: torch.nn.Module,
    output_dir: str | Path,
    recipe: Any,
    tokenizer: Any = None,
    *,
    save_compressed: bool = True,
    overwrite: bool = False,
) -> None:
    """After training on several ranks (tensor parallelism, DDP), write the checkpoint once:
    rank 0 writes it atomically (``checkpoint.directory.save_checkpoint``) while the other
    ranks wait, and every rank raises if it failed; in one process, just the write. Call every
    rank's copy alike, after the session has finalized (which gathers a tensor-parallel model
    into whole tensors on every rank).

    :param recipe: the recipe trained with (a Recipe, a list of modifiers, a dict or a path)
    :raises ValueError: the model still holds DTensor parameters (not finalized yet)
    """
    if has_sharded_parameters(model):
        raise ValueError(
            "save_checkpoint_once: the model still holds tensor-parallel (DTensor) parameters; "
            "finalize the compression session first (it gathers them into whole tensors)"
        )
    parsed = resolve_recipe(recipe)
    on_first_rank(
        "save the checkpoint",
        lambda: save_checkpoint(
            model,
            output_dir,
            parsed,
            tokenizer,
            save_compressed=save_compressed,
            overwrite=overwrite,
        ),
    )

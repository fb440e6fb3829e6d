"""``oneshot``: post-training compression of a model with a recipe, in one call."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from compressor.calibration.arguments import CalibrationArguments, PipelineName
from compressor.calibration.data import Batch, build_calibration_batches
from compressor.calibration.pipelines import PIPELINES, resolve_pipeline
from compressor.calibration.pipelines.common import check_model_takes
from compressor.calibration.sources import resolve_dataset
from compressor.checkpoint.directory import OutputArguments, check_output_dir, save_checkpoint
from compressor.core.session import create_session
from compressor.entrypoints.loading import load_model, load_tokenizer
from compressor.entrypoints.process_group import (
    check_model_agreement,
    check_recipe_for_ranks,
    on_first_rank,
    rank_offload_folder,
    share_batches,
)
from compressor.recipe import Recipe, RecipeError, resolve_recipe
from compressor.utils.offload import (
    check_device_unset,
    check_offload_support,
    prepare_offloaded_model,
)

__all__ = ["oneshot"]


def oneshot(
    model: torch.nn.Module | str | Path,
    recipe: Any,
    dataset: Any = None,
    *,
    tokenizer: Any = None,
    num_calibration_samples: int = 256,
    max_seq_length: int = 512,
    batch_size: int = 1,
    pipeline: PipelineName = "auto",
    output_dir: str | Path | None = None,
    save_compressed: bool = True,
    overwrite: bool = False,
    device: str | None = None,
    offload_folder: str | Path | None = None,
    decompress_after_save: bool = True,
) -> torch.nn.Module:
    """Compress ``model`` with ``recipe`` after training, calibrating on ``dataset``.

    Every option is validated (``CalibrationArguments``, ``OutputArguments``, the device
    against those this torch build sees) and the output directory checked (writable; an
    existing one replaced only with ``overwrite`` and only when it is a checkpoint or empty;
    apart from ``offload_folder``) before the model is loaded, so bad input fails at once. A
    modifier with a training schedule (``start``, ``end`` or ``update``) is refused the same
    way: this is a post-training run (see ``_refuse_training_schedules``).

    :param model: a loaded model, a checkpoint directory, a ``.gguf`` file, or a Hugging Face
        Hub id (a str naming no local path, ``name`` or ``org/name``). A model loaded
        offloaded (``from_pretrained(..., device_map=..., offload_folder=...)``) stays
        offloaded: one decoder layer at a time is brought into memory (GPTQModifier and
        post-training QuantizationModifier; other modifiers are refused)
    :param recipe: a Recipe, a list of modifiers, a dict, a ``pathlib.Path`` to YAML, or a
        str: an existing file's path, or YAML text (a str with a newline); any other str is
        refused with both readings shown (``compressor.recipe.resolve.recipe_from_str``)
    :param dataset: a ``datasets.Dataset`` (``input_ids`` or ``text``), a list of str, a
        DataLoader, ``"self"`` (text sampled from the model), or a str or ``pathlib.Path``
        naming data: a text file, a json/jsonl/csv/parquet file or a dataset directory
        (``datasets.load_dataset`` / ``load_from_disk``), or a Hub dataset id; a str that is
        none of these is refused (``compressor.calibration.sources``); required when a
        modifier needs calibration data
    :param tokenizer: a tokenizer (or its path); by default the one beside a model path
    :param num_calibration_samples: sequences to calibrate on
    :param max_seq_length: tokens per sequence at most
    :param batch_size: sequences per forward pass
    :param pipeline: auto, datafree, basic or sequential (see ``compressor.calibration.pipelines``)
    :param output_dir: save model, tokenizer and ``recipe.yaml`` here (atomically)
    :param save_compressed: save the compressed format rather than dense weights
    :param overwrite: replace an existing ``output_dir`` that is a checkpoint (``config.json``,
        ``recipe.yaml`` or our model card) or empty; anything else there is an error
    :param device: where the sequential pipeline computes, one layer at a time
    :param offload_folder: with a checkpoint directory as ``model``: load its decoder layers
        offloaded to disk in this folder (for a model larger than memory); under a process
        group each rank offloads to its own folder in it (``rank0``, ``rank1``, ...)
    :param decompress_after_save: after writing ``output_dir``, give the quantized model its
        (dequantized) weights back, as it had them before the save. False when the caller
        does not use the returned model (the CLI): the save skips that work and leaves the
        model compressed as written (a forward pass would decompress it first); the
        checkpoint is the same
    :return: the compressed model

    Under an initialised process group (``torchrun``, ``accelerate launch``), each rank
    calibrates on its contiguous share of the calibration batches, the modifiers reduce their
    statistics over the ranks and share out their solves, every rank returns the same model,
    and rank 0 alone writes ``output_dir`` while the others wait. Before any work, a modifier
    that cannot reduce its statistics is refused, and ranks given different recipes, options,
    models or data raise (``compressor.entrypoints.process_group``; docs/distributed.md).
    """
    calibration, output = _check_arguments(
        num_calibration_samples=num_calibration_samples,
        max_seq_length=max_seq_length,
        batch_size=batch_size,
        pipeline=pipeline,
        device=device,
        output_dir=output_dir,
        save_compressed=save_compressed,
        overwrite=overwrite,
        offload_folder=offload_folder,
        decompress_after_save=decompress_after_save,
    )
    parsed = _parse_recipe(recipe, dataset)
    check_recipe_for_ranks(parsed, calibration, output, model)
    dataset = resolve_dataset(dataset)  # a named dataset is loaded (or refused) before the model
    offload_folder = rank_offload_folder(offload_folder)  # one per rank under a process group
    loaded, tokenizer = _load(model, tokenizer, parsed, device, offload_folder)
    pipeline_name = resolve_pipeline(calibration.pipeline, parsed.modifiers, loaded)
    needs_data = any(m.requires_calibration_data() for m in parsed.modifiers)
    batches = _calibration_batches(
        pipeline_name, dataset, calibration, loaded, tokenizer, needs_data
    )
    check_model_agreement(loaded, batches)
    if batches:
        batches = share_batches(batches)
    _compress(loaded, parsed, pipeline_name, batches, device)
    on_first_rank("save the checkpoint", lambda: _save(loaded, output, parsed, tokenizer))
    return loaded


def _check_arguments(
    *,
    num_calibration_samples: int,
    max_seq_length: int,
    batch_size: int,
    pipeline: PipelineName,
    device: str | None,
    output_dir: str | Path | None,
    save_compressed: bool,
    overwrite: bool,
    offload_folder: str | Path | None,
    decompress_after_save: bool = True,
) -> tuple[CalibrationArguments, OutputArguments]:
    """Validate every option and check the output directory (writable, replaceable, apart
    from ``offload_folder``), before anything is loaded."""
    calibration = CalibrationArguments(
        num_calibration_samples=num_calibration_samples,
        max_seq_length=max_seq_length,
        batch_size=batch_size,
        pipeline=pipeline,
        device=device,
    )
    output = OutputArguments(
        output_dir=output_dir,
        save_compressed=save_compressed,
        overwrite=overwrite,
        decompress_after_save=decompress_after_save,
    )
    if output.output_dir is not None:
        if offload_folder is not None:
            _check_apart(output.output_dir, Path(offload_folder))
        target, replace = output.output_dir, output.overwrite
        on_first_rank("check output_dir", lambda: check_output_dir(target, replace))
    return calibration, output


def _check_apart(output_dir: Path, offload_folder: Path) -> None:
    """Refuse an ``offload_folder`` that is, holds or lies in ``output_dir``: the save replaces
    ``output_dir`` (and with it offloaded weights the model still reads) or refuses to."""
    out = Path(os.path.realpath(output_dir))
    offload = Path(os.path.realpath(offload_folder))
    if out == offload or out in offload.parents or offload in out.parents:
        raise ValueError(
            f"offload_folder={str(offload_folder)!r} and output_dir={str(output_dir)!r} "
            "overlap: the checkpoint written to output_dir would replace the offloaded weights "
            "the model reads; choose an offload_folder outside output_dir"
        )


def _parse_recipe(recipe: Any, dataset: Any) -> Recipe:
    """The recipe as a ``Recipe``; an error when a modifier has a training schedule or needs
    data and none is given."""
    parsed = resolve_recipe(recipe)
    _refuse_training_schedules(parsed)
    needs_data = [type(m).__name__ for m in parsed.modifiers if m.requires_calibration_data()]
    if needs_data and dataset is None:
        raise ValueError(
            f"{', '.join(needs_data)} need(s) calibration data but dataset is None: pass a "
            "dataset (a datasets.Dataset, a list of str, a DataLoader, a text, json, csv or "
            "parquet file, a dataset directory or a Hub dataset id) or dataset='self' to "
            "calibrate on text sampled from the model"
        )
    return parsed


def _refuse_training_schedules(recipe: Recipe) -> None:
    """The one rule for schedules in a post-training run: a modifier with ``start``, ``end``
    or ``update`` set is refused, whatever the modifier, before any work.

    Those offsets count optimizer steps (or epochs), and a post-training run takes none: a
    scheduled modifier would start at once, never, or only at finalize depending on its
    offsets and its kind, and the saved ``recipe.yaml`` would claim a schedule that did not
    run. Refusing it, rather than running it at once, keeps one meaning for ``start``.

    :raises RecipeError: naming the place in the recipe, the modifier and the field
    """
    for stage in recipe.stages:
        for group in stage.groups:
            for modifier in group.modifiers:
                schedule = modifier.training_schedule()
                if not schedule:
                    continue
                name = type(modifier).__name__
                field = next(iter(schedule))
                given = ", ".join(f"{k}: {v:g}" for k, v in schedule.items())
                raise RecipeError(
                    f"{stage.name}_stage -> {group.name}_modifiers -> {name} -> {field}: "
                    f"{name} has a training schedule ({given}), but oneshot compresses after "
                    "training, where no optimizer steps are counted. Remove "
                    f"{' and '.join(schedule)} to compress in this run, or run the recipe "
                    "during training (CompressionSession in your loop, or CompressionTrainer)"
                )


def _load(
    model: torch.nn.Module | str | Path,
    tokenizer: Any,
    recipe: Recipe,
    device: str | None,
    offload_folder: str | Path | None,
) -> tuple[torch.nn.Module, Any]:
    """The model and tokenizer, loaded; an offloaded model prepared for one layer at a time
    (when the recipe's modifiers support it)."""
    loaded = load_model(model, offload_folder)  # first: its error is the one to show
    tokenizer = load_tokenizer(model, tokenizer)
    if prepare_offloaded_model(loaded):
        check_offload_support(recipe.modifiers)
    check_device_unset(loaded, device)
    return loaded, tokenizer


def _calibration_batches(
    pipeline: str,
    dataset: Any,
    calibration: CalibrationArguments,
    model: torch.nn.Module,
    tokenizer: Any,
    needs_data: bool = False,
) -> list[Batch]:
    """The batches ``pipeline`` runs through the model (for the datafree one, none, or those
    it only offers at calibration start when a modifier ``needs_data`` there)."""
    if pipeline == "datafree" and not needs_data:
        if dataset is not None:
            logger.warning("the datafree pipeline runs no data; dataset is not used")
        return []
    if dataset is None:
        raise ValueError(
            f"pipeline={pipeline!r} runs calibration data through the model but dataset is None"
        )
    batches = build_calibration_batches(dataset, calibration, model=model, tokenizer=tokenizer)
    check_model_takes(model, batches[0])
    return batches


def _compress(
    model: torch.nn.Module,
    recipe: Recipe,
    pipeline: str,
    batches: list[Batch],
    device: str | None,
) -> None:
    """Run the recipe's session with ``pipeline`` over ``batches``; on an error every
    modifier's hooks are removed before it propagates."""
    logger.info(
        "oneshot: {} pipeline, {} calibration batch(es), modifiers: {}",
        pipeline,
        len(batches),
        ", ".join(type(m).__name__ for m in recipe.modifiers),
    )
    began = time.perf_counter()
    with create_session() as session:
        session.initialize(model=model, recipe=recipe)
        try:
            # nothing reads the last layer's outputs: the sequential pipeline may skip them
            extra = {"keep_outputs": False} if pipeline == "sequential" else {}
            PIPELINES[pipeline](model, batches, session, device=device, **extra)
        except BaseException:
            for modifier in recipe.modifiers:
                modifier.remove_hooks()
            raise
        session.finalize()
    logger.info("oneshot: compressed in {:.1f} s", time.perf_counter() - began)


def _save(model: torch.nn.Module, output: OutputArguments, recipe: Recipe, tokenizer: Any) -> None:
    """Save model, tokenizer and recipe to ``output.output_dir`` when one is given."""
    if output.output_dir is None:
        return
    save_checkpoint(
        model,
        output.output_dir,
        recipe,
        tokenizer,
        save_compressed=output.save_compressed,
        overwrite=output.overwrite,
        decompress=output.decompress_after_save,
    )

"""``oneshot``: post-training compression of a model with a recipe, in one call."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from compressor.calibration.arguments import CalibrationArguments, PipelineName
from compressor.calibration.data import Batch, build_calibration_batches
from compressor.calibration.pipelines import PIPELINES, resolve_pipeline
from compressor.checkpoint.directory import OutputArguments, check_output_dir, save_checkpoint
from compressor.core.session import create_session
from compressor.entrypoints.loading import load_model, load_tokenizer
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
) -> torch.nn.Module:
    """Compress ``model`` with ``recipe`` after training, calibrating on ``dataset``.

    Every option is validated (``CalibrationArguments``, ``OutputArguments``) and the output
    directory checked before the model is loaded, so bad input fails at once. A modifier with
    a training schedule (``start``, ``end`` or ``update``) is refused the same way: this is a
    post-training run (see ``_refuse_training_schedules``).

    :param model: a loaded model, a checkpoint directory or a ``.gguf`` file. A model loaded
        offloaded (``from_pretrained(..., device_map=..., offload_folder=...)``) stays
        offloaded: one decoder layer at a time is brought into memory (GPTQModifier and
        post-training QuantizationModifier; other modifiers are refused)
    :param recipe: a Recipe, a list of modifiers, a dict or a ``pathlib.Path`` to YAML
    :param dataset: a ``datasets.Dataset`` (``input_ids`` or ``text``), a list of str, a
        ``pathlib.Path`` to a text file, a DataLoader, or ``"self"`` (text sampled from the
        model); required when a modifier needs calibration data
    :param tokenizer: a tokenizer (or its path); by default the one beside a model path
    :param num_calibration_samples: sequences to calibrate on
    :param max_seq_length: tokens per sequence at most
    :param batch_size: sequences per forward pass
    :param pipeline: auto, datafree, basic or sequential (see ``compressor.calibration.pipelines``)
    :param output_dir: save model, tokenizer and ``recipe.yaml`` here (atomically)
    :param save_compressed: save the compressed format rather than dense weights
    :param overwrite: replace an existing ``output_dir``
    :param device: where the sequential pipeline computes, one layer at a time
    :param offload_folder: with a checkpoint directory as ``model``: load its decoder layers
        offloaded to disk in this folder (for a model larger than memory)
    :return: the compressed model
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
    )
    parsed = _parse_recipe(recipe, dataset)
    loaded, tokenizer = _load(model, tokenizer, parsed, device, offload_folder)
    pipeline_name = resolve_pipeline(calibration.pipeline, parsed.modifiers, loaded)
    batches = _calibration_batches(pipeline_name, dataset, calibration, loaded, tokenizer)
    _compress(loaded, parsed, pipeline_name, batches, device)
    _save(loaded, output, parsed, tokenizer)
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
) -> tuple[CalibrationArguments, OutputArguments]:
    """Validate every option and check the output directory, before anything is loaded."""
    calibration = CalibrationArguments(
        num_calibration_samples=num_calibration_samples,
        max_seq_length=max_seq_length,
        batch_size=batch_size,
        pipeline=pipeline,
        device=device,
    )
    output = OutputArguments(
        output_dir=output_dir, save_compressed=save_compressed, overwrite=overwrite
    )
    if output.output_dir is not None:
        check_output_dir(output.output_dir, output.overwrite)
    return calibration, output


def _parse_recipe(recipe: Any, dataset: Any) -> Recipe:
    """The recipe as a ``Recipe``; an error when a modifier has a training schedule or needs
    data and none is given."""
    parsed = resolve_recipe(recipe)
    _refuse_training_schedules(parsed)
    needs_data = [type(m).__name__ for m in parsed.modifiers if m.requires_calibration_data()]
    if needs_data and dataset is None:
        raise ValueError(
            f"{', '.join(needs_data)} need(s) calibration data but dataset is None: pass a "
            "dataset (a datasets.Dataset, a list of str, a pathlib.Path to a text file, a "
            "DataLoader) or dataset='self' to calibrate on text sampled from the model"
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
    tokenizer = load_tokenizer(model, tokenizer)
    loaded = load_model(model, offload_folder)
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
) -> list[Batch]:
    """The batches ``pipeline`` runs through the model (none for the datafree one)."""
    if pipeline == "datafree":
        if dataset is not None:
            logger.warning("the datafree pipeline runs no data; dataset is not used")
        return []
    if dataset is None:
        raise ValueError(
            f"pipeline={pipeline!r} runs calibration data through the model but dataset is None"
        )
    return build_calibration_batches(dataset, calibration, model=model, tokenizer=tokenizer)


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
    )

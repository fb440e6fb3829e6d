"""Saving a compressed model as a real, smaller checkpoint in compressed-tensors format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from compressed_tensors import TRANSFORM_CONFIG_NAME
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
from compressed_tensors.quantization.utils import is_model_quantized
from loguru import logger

from compressor.checkpoint.model_card import MODEL_CARD_FILE, is_model_card
from compressor.checkpoint.offloaded import written_shard_by_shard
from compressor.checkpoint.packing import pack_quantized_modules
from compressor.checkpoint.reload_limits import (
    has_experts,
    unpacked_embeddings,
    warn_expert_activations,
    warn_unloadable_zero_points,
)
from compressor.checkpoint.sparsity import (
    WeightZeros,
    config_of_zeros,
    linear_zeros,
    sparsity_config,
    write_sparsity_config,
)
from compressor.checkpoint.transforms import has_online_transforms
from compressor.core.session import CompressionSession
from compressor.modifiers.pruning.oneshot import OneShotSparsityModifier
from compressor.modifiers.pruning.sparse import SparsePruningModifier
from compressor.modifiers.quantization.kv_cache import kv_cache_scheme_of
from compressor.recipe import Recipe, resolve_recipe
from compressor.utils.conv1d import conv1d_layout_state_dict
from compressor.utils.memory import freed_memory_returned
from compressor.utils.threads import one_cpu_thread

__all__ = [
    "RECIPE_FILE",
    "enable_compressed_save_pretrained",
    "save_compressed",
    "save_pretrained_compressed_after",
    "write_compressed",
]

RECIPE_FILE = "recipe.yaml"
# the modifiers that leave zeros in dense weights (unstructured or N:M)
_ZERO_MAKERS = (OneShotSparsityModifier, SparsePruningModifier)


def save_compressed(
    model: torch.nn.Module,
    output_dir: str | Path,
    recipe: Any = None,
    *,
    tokenizer: Any = None,
    decompress: bool = True,
    **save_kwargs: Any,
) -> Path:
    """Write ``model`` to ``output_dir`` in compressed-tensors format, loadable by
    ``transformers.AutoModelForCausalLM.from_pretrained``.

    Quantized layers are stored as the scheme says (packed int4, int8, fp8, nvfp4, mxfp4)
    with their scales and zero points, and ``config.json`` gets the ``quantization_config``
    (with the ``kv_cache_scheme`` of a quantized key/value cache, whose scales are saved on
    the attention modules, and the ``transform_config`` of online rotations, whose matrices
    are saved on their modules); a model without any of these is saved as is. A model with
    sparse Linears (pruned, measured on its weights) gets compressed-tensors'
    ``sparsity_config`` under ``quantization_config`` (structure, sparse modules, global
    fraction; format ``dense``, see ``checkpoint.sparsity``), quantized or not. The model is
    compressed for the write, then decompressed (unless ``decompress`` is False).

    :param model: a transformers model, typically after a compression session
    :param output_dir: the folder to write (created when missing)
    :param recipe: the recipe to store as ``recipe.yaml``: a Recipe, a list of modifiers,
        a dict or a path; none is written when None. A ``recipe.yaml`` and a model card
        (``README.md`` that compressor wrote) left in ``output_dir`` by an earlier save are
        removed first (logged), so they never describe another model; other files stay
    :param tokenizer: also saved into ``output_dir`` when given
    :param decompress: after writing, give a quantized model its (dequantized) weights back,
        as they were before the save. False, for a caller that does not use the model
        afterwards (the CLI): it is left compressed as written, which saves the time of
        decompressing it; a forward pass would still decompress it first (compressed-tensors'
        hook). The checkpoint is the same either way
    :param save_kwargs: passed to transformers' ``save_pretrained`` (``max_shard_size``, ...)
    :return: the output folder
    """
    write_compressed(
        model, output_dir, recipe, tokenizer=tokenizer, decompress=decompress, **save_kwargs
    )
    return Path(output_dir)


def write_compressed(
    model: torch.nn.Module,
    output_dir: str | Path,
    recipe: Any = None,
    *,
    tokenizer: Any = None,
    decompress: bool = True,
    **save_kwargs: Any,
) -> dict[str, WeightZeros]:
    """``save_compressed``, returning the zeros it counted in every Linear's weight (by
    module name; ``checkpoint.sparsity.linear_zeros``), for a model card to describe without
    reading the weights again."""
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"save_compressed needs a transformers model with save_pretrained, got "
            f"{type(model).__name__}"
        )
    _refuse_compressed(model)
    conv1d_state = conv1d_layout_state_dict(model)  # refuses quantized Conv1D before writing
    if conv1d_state is not None:
        save_kwargs = {**save_kwargs, "state_dict": conv1d_state}
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    _remove_stale_descriptions(output)
    kv_cache_scheme = kv_cache_scheme_of(model)
    unpacked_embeddings(model)
    compressor = ModelCompressor.from_pretrained_model(model) if is_model_quantized(model) else None
    if compressor is None and kv_cache_scheme is not None:  # only the cache is quantized
        compressor = ModelCompressor(
            quantization_config=QuantizationConfig(
                config_groups={}, quantization_status=QuantizationStatus.FROZEN
            )
        )
    transform_config = getattr(model, TRANSFORM_CONFIG_NAME, None)
    if has_online_transforms(model) and transform_config is not None:
        # the rotations applied at runtime must reach config.json, quantized or not
        if compressor is None:
            compressor = ModelCompressor(transform_config=transform_config)
        compressor.transform_config = transform_config
    if compressor is not None and kv_cache_scheme is not None:
        # compressed-tensors finds the scheme only on attention modules it hooked itself
        assert compressor.quantization_config is not None
        compressor.quantization_config.kv_cache_scheme = kv_cache_scheme.model_copy(deep=True)
    # memory-bound passes over every weight: on one thread, which a second core barely
    # speeds up, and which does not stall when other processes share the cores (utils.threads)
    with one_cpu_thread():
        measured = _write_model(model, output, compressor, save_kwargs, decompress)
        # the rest measured after the save: a quantized model is then decompressed, and its
        # weights are the checkpoint's and what it computes with as they are
        zeros = linear_zeros(model, measured)
    sparsity = config_of_zeros(zeros)
    if sparsity is not None and compressor is None and has_experts(model):
        # transformers (5.24) reloads the experts of a compressed-tensors checkpoint through
        # its dequantizing converter, which fails on a config without quantization
        logger.info(
            "{} sparsity ({:.3f} of the Linear weights) is not recorded in config.json: a "
            "mixture-of-experts checkpoint with a sparsity-only quantization_config does not "
            "reload in transformers; the model card states it",
            sparsity.sparsity_structure,
            sparsity.global_sparsity,
        )
    elif sparsity is not None:
        write_sparsity_config(output, sparsity)
        logger.info(
            "recorded {} sparsity ({:.3f} of the Linear weights) in {}",
            sparsity.sparsity_structure,
            sparsity.global_sparsity,
            output / "config.json",
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    if isinstance(recipe, Recipe):
        # written as it is: a session's recipe has run, and rebuilding fresh modifiers from it
        # (what resolve_recipe does with a used Recipe) only to serialise them is wasted work
        recipe.save(output / RECIPE_FILE)
    elif recipe is not None:
        resolve_recipe(recipe).save(output / RECIPE_FILE)
    return zeros


def _write_model(
    model: torch.nn.Module,
    output: Path,
    compressor: ModelCompressor | None,
    save_kwargs: dict[str, Any],
    decompress: bool,
) -> dict[str, WeightZeros]:
    """Write the model's weights and config (compressed by ``compressor`` when it quantizes);
    return the zeros of the Linears counted on the way (those packed here, and every one when
    the model is left compressed)."""
    measured: dict[str, WeightZeros] = {}
    if compressor is None:
        logger.info("the model holds no quantized layers: saving it dense to {}", output)
        _dense_save(model, output, save_kwargs)
    elif compressor.quantization_config is None:
        logger.info("saving dense with online rotations (transform_config) to {}", output)
        _dense_save(model, output, save_kwargs)
        compressor.update_config(str(output))
    else:
        assert compressor.quantization_config is not None
        warn_unloadable_zero_points(model, str(compressor.quantization_config.format))
        warn_expert_activations(model, str(compressor.quantization_config.format))
        logger.info(
            "saving compressed ({} format) to {}", compressor.quantization_config.format, output
        )
        try:
            # int weights packed here in one pass each, their zeros counted on the way; the
            # rest (other formats) by compressed-tensors
            measured = pack_quantized_modules(model, compressor.force_compression_format)
            if not decompress:  # weights compressed next are not read back after the write
                measured = linear_zeros(model, measured)
            # each weight is read (from disk, when offloaded) and freed once: given back as
            # it goes, not kept resident in the heap until the pass ends (utils.memory)
            with freed_memory_returned():
                compressor.compress_model(model, skip_compressed=True)
            _dense_save(model, output, save_kwargs)
            compressor.update_config(str(output))
        finally:
            if decompress:
                with freed_memory_returned():
                    compressor.decompress_model(model)
            else:
                logger.info(
                    "the model is left compressed as written (decompress=False); a forward "
                    "pass decompresses it first"
                )
    return measured


def _refuse_compressed(model: torch.nn.Module) -> None:
    """A model left compressed by an earlier save (``decompress=False``) has no weights to
    compress again; it is refused before anything is written."""
    for name, module in model.named_modules():
        if getattr(module, "quantization_status", None) == QuantizationStatus.COMPRESSED:
            raise ValueError(
                f"module {name!r} is compressed (quantization_status 'compressed', left so by "
                "a save with decompress=False): save it before such a save, or run a forward "
                "pass first (it decompresses the model)"
            )


def _remove_stale_descriptions(output: Path) -> None:
    """Remove the ``recipe.yaml`` and our ``README.md`` model card of an earlier save into
    ``output``: this save rewrites the weights and config, and they would describe them."""
    stale = [output / RECIPE_FILE]
    card = output / MODEL_CARD_FILE
    if card.is_file() and is_model_card(card.read_text(encoding="utf-8", errors="replace")):
        stale.append(card)
    for path in stale:
        if path.is_file():
            path.unlink()
            logger.info("removed {} of an earlier save (it described another model)", path)


def _dense_save(model: torch.nn.Module, output: Path, save_kwargs: dict[str, Any]) -> None:
    # weights on disk are read one shard at a time, not all at once (checkpoint.offloaded)
    with written_shard_by_shard(model, save_kwargs) as kwargs:
        # the class's own method: the instance's may be the compressed wrapper below
        type(model).save_pretrained(model, output, **kwargs)  # type: ignore[attr-defined]


def enable_compressed_save_pretrained(model: torch.nn.Module, recipe: Any = None) -> None:
    """Make ``model.save_pretrained(dir)`` write the compressed format (``save_compressed``,
    with ``recipe`` as ``recipe.yaml``) for this model object."""
    if not hasattr(type(model), "save_pretrained"):
        return

    def save_pretrained(save_directory: str | Path, **kwargs: Any) -> None:
        kwargs.setdefault("recipe", recipe)
        save_compressed(model, save_directory, **kwargs)

    model.save_pretrained = save_pretrained  # type: ignore[method-assign]


def save_pretrained_compressed_after(session: CompressionSession) -> None:
    """After a session that quantized or sparsified its model (or gave it online rotations),
    ``model.save_pretrained`` writes the compressed format (with the ``sparsity_config`` of a
    sparse model) and the session's recipe (a ``CompressionSession.finalize_steps`` entry,
    plugged in by the package root)."""
    model = session.state.model if session.state is not None else None
    if model is None:
        return
    # measured only after a pruning recipe: it reads every weight
    prunes = any(isinstance(m, _ZERO_MAKERS) for m in getattr(session.recipe, "modifiers", []))
    if (
        is_model_quantized(model)
        or kv_cache_scheme_of(model) is not None
        or has_online_transforms(model)
        or (prunes and sparsity_config(model) is not None)
    ):
        enable_compressed_save_pretrained(model, session.recipe)

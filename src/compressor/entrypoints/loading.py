"""Load the model (and its tokenizer) that oneshot and the CLI work on."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from compressor.checkpoint.kv_cache import restore_kv_cache_quantization
from compressor.checkpoint.transforms import restore_online_rotations
from compressor.utils.hub import has_hub_id_form

__all__ = [
    "GGUF_SOURCE_FILE",
    "check_not_compressed",
    "gguf_checkpoint",
    "gguf_key",
    "is_hub_id",
    "layers_on_disk_map",
    "load_model",
    "load_tokenizer",
]

_DECOMPRESS = (
    "compress the original (uncompressed) model instead, or load this one decompressed "
    "(from_pretrained(path, quantization_config=CompressedTensorsConfig(run_compressed=False))) "
    "and pass the model"
)


def check_not_compressed(model: torch.nn.Module) -> None:
    """Refuse a model whose layers hold compressed weights (a compressed-tensors checkpoint
    loaded as it is stored): they have packed tensors (``weight_packed``, ...) and no
    ``weight`` to compress.

    :param model: a loaded model
    :raises ValueError: naming a compressed layer and what to do
    """
    for name, module in model.named_modules():
        params = [n for n, _ in module.named_parameters(recurse=False)]
        if "weight" not in params and any(n.startswith("weight_") for n in params):
            raise ValueError(
                f"the model is already compressed: {name} holds {', '.join(params)} and no "
                f"weight; {_DECOMPRESS}"
            )


def _check_config_not_compressed(path: Path) -> None:
    """Refuse a checkpoint that ``config.json`` says is stored compressed (compressed-tensors
    ``quantization_config`` with a format other than dense), before loading it."""
    import json

    config = path / "config.json"
    if not config.is_file():
        return
    try:
        quantization = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    except (ValueError, AttributeError):
        return  # transformers reports an unreadable config when it loads it
    if not isinstance(quantization, dict):
        return
    method, layout = quantization.get("quant_method"), quantization.get("format")
    if method == "compressed-tensors" and layout not in (None, "dense"):
        raise ValueError(
            f"{path} is already compressed (compressed-tensors format {layout!r} in its "
            f"config.json); {_DECOMPRESS}"
        )


def load_model(
    model: torch.nn.Module | str | Path,
    offload_folder: str | Path | None = None,
    *,
    compressed_ok: bool = False,
) -> torch.nn.Module:
    """A loaded model as is; a checkpoint directory, a ``.gguf`` file or a Hugging Face Hub id
    (a str naming no local path, of the form ``name`` or ``org/name``) loaded as a causal LM.

    A checkpoint with a quantized key/value cache gets it back (``restore_kv_cache_quantization``),
    and one with online rotations gets them back (``restore_online_rotations``).

    A GGUF file is dequantized by transformers' GGUF loader (which needs the ``gguf`` package).
    A model that is already compressed (a compressed-tensors checkpoint with packed weights) is
    refused, a checkpoint directory before it is loaded.

    :param offload_folder: load a checkpoint directory with its decoder layers offloaded to
        disk in this folder, the rest in memory (for a model larger than memory; the
        sequential pipeline then brings in one layer at a time)
    :param compressed_ok: accept an already-compressed model (to evaluate it, not to
        compress it again)
    """
    if isinstance(model, torch.nn.Module):
        if not compressed_ok:
            check_not_compressed(model)
        if offload_folder is not None:
            raise ValueError(
                "offload_folder applies when model is a checkpoint directory; a loaded model "
                "is used as it was loaded (load it with device_map and offload_folder instead)"
            )
        return model
    if not isinstance(model, str | Path):
        raise TypeError(
            "model must be a torch.nn.Module, a checkpoint directory, a .gguf file or a "
            f"Hugging Face Hub id; got {type(model).__name__}"
        )
    from transformers import AutoModelForCausalLM

    if is_hub_id(model):
        if offload_folder is not None:
            raise ValueError(
                f"offload_folder applies to checkpoint directories; {model!r} is a hub id "
                "(download it first, then pass its directory)"
            )
        logger.info("loading {} from the Hugging Face Hub", model)
        return _from_hub(AutoModelForCausalLM, "model", str(model))
    path = Path(model)
    if path.is_dir() and not compressed_ok:
        _check_config_not_compressed(path)
    if offload_folder is not None and not path.is_dir():
        raise ValueError(
            f"offload_folder applies to checkpoint directories; {str(model)!r} is not one "
            "(a .gguf file is dequantized in memory)"
        )
    if path.is_file() and path.suffix == ".gguf":
        logger.info("loading {} (GGUF, dequantized)", path)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        return _as_dense_model(loaded, path)
    if path.is_dir():
        if offload_folder is not None:
            logger.info("loading {} with its decoder layers offloaded to {}", path, offload_folder)
            return AutoModelForCausalLM.from_pretrained(
                path, device_map=layers_on_disk_map(path), offload_folder=str(offload_folder)
            )
        logger.info("loading {}", path)
        loaded = AutoModelForCausalLM.from_pretrained(path)
        if not compressed_ok:
            check_not_compressed(loaded)
        restore_kv_cache_quantization(loaded, path)
        restore_online_rotations(loaded, path)
        return loaded
    raise FileNotFoundError(
        f"model {str(model)!r} is neither a checkpoint directory nor a .gguf file"
        + ("" if isinstance(model, Path) else ", nor a Hugging Face Hub id ('name' or 'org/name')")
    )


def is_hub_id(source: Any) -> bool:
    """Whether ``source`` is read as a Hugging Face Hub id: a str (a ``pathlib.Path`` is
    always a path) that names nothing on disk and has the form ``name`` or ``org/name``
    (no ``..``, not ending like a weights file)."""
    return (
        isinstance(source, str)
        and not Path(source).exists()
        and has_hub_id_form(source, file_suffixes=(".gguf", ".safetensors", ".bin"))
    )


def _from_hub(auto_class: Any, what: str, hub_id: str, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(hub_id)``; a failure (offline, unknown id) says that the
    string was read as a hub id because no such local path exists."""
    try:
        return auto_class.from_pretrained(hub_id, **kwargs)
    except OSError as err:
        raise OSError(
            f"{what} {hub_id!r}: no such local path ({Path(hub_id).absolute()}), so it was "
            f"read as a Hugging Face Hub id, and loading it from the Hub failed (offline? "
            f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}): {err}"
        ) from err


GGUF_SOURCE_FILE = "gguf_source.json"  # written last: a directory with it is complete


def gguf_key(path: str | Path) -> str:
    """The sha256 of a file's content (a GGUF file: its conversion's cache key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def gguf_checkpoint(path: str | Path, cache_dir: str | Path) -> Path:
    """A checkpoint directory (fp32 safetensors, config, tokenizer) holding the GGUF file at
    ``path`` dequantized, converted once and reused while the file's content is the same.

    Dequantizing a GGUF file and building its tokenizer takes far longer than loading the
    result (tens of seconds against about one for SmolLM2-135M); the conversion is keyed by
    the file's sha256, so a changed file is converted again and a copy elsewhere is not.
    The directory is written beside its final place and renamed into it when complete.

    :param path: a ``.gguf`` file
    :param cache_dir: the folder holding converted models (one subfolder per file content)
    :return: ``cache_dir/<the sha256's first 16 hex digits>`` (its ``gguf_source.json`` names
        the file it came from)
    """
    path = Path(path)
    if not path.is_file() or path.suffix != ".gguf":
        raise FileNotFoundError(f"gguf_checkpoint needs a .gguf file; {str(path)!r} is not one")
    key = gguf_key(path)
    cache_dir = Path(cache_dir)
    target = cache_dir / key[:16]  # the content alone: a copy or a renamed file reuses it
    if (target / GGUF_SOURCE_FILE).is_file():
        logger.info("{}: using its conversion in {}", path.name, target)
        return target
    logger.info("converting {} once into {}", path, target)
    tokenizer = load_tokenizer(path)
    model: Any = load_model(path)
    model = model.float()
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=cache_dir))
    try:
        model.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        source = {"gguf": str(path.resolve()), "sha256": key, "bytes": path.stat().st_size}
        (partial / GGUF_SOURCE_FILE).write_text(json.dumps(source, indent=1), encoding="utf-8")
        if target.exists():  # an incomplete earlier attempt (no source file)
            shutil.rmtree(target)
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if (target / GGUF_SOURCE_FILE).is_file():  # another process finished it first
            return target
        raise
    return target


def layers_on_disk_map(path: str | Path) -> dict[str, str]:
    """An accelerate device map for the checkpoint at ``path``: each decoder layer on disk,
    everything else (embeddings, final norm, head) in CPU memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from compressor.architectures import find_decoder_layers

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    layers_path, layers = find_decoder_layers(skeleton)
    device_map: dict[str, str] = {}
    parent = ""
    for part in layers_path.split("."):  # siblings of each module on the way to the layers
        for name, _child in skeleton.get_submodule(parent).named_children():
            if name != part:
                device_map[f"{parent}.{name}" if parent else name] = "cpu"
        parent = f"{parent}.{part}" if parent else part
    for index in range(len(layers)):
        device_map[f"{layers_path}.{index}"] = "disk"
    return device_map


def _as_dense_model(model: Any, path: Path) -> Any:
    """Detach transformers' GGUF quantizer from a model whose weights it dequantized, so that
    it is an ordinary dense model (which compresses, and saves with ``save_pretrained``)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise ValueError(
            f"{path}: transformers kept {len(packed)} weight(s) packed in GGUF blocks (e.g. "
            f"{packed[0]}); compressor needs dense weights"
        )
    quantizer.remove_quantization_config(model)
    return model


def load_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """``tokenizer`` as given (a path is loaded), else the one beside ``model`` when it is a
    path, else None."""
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, str | Path):
        return tokenizer
    source = tokenizer if tokenizer is not None else model
    if not isinstance(source, str | Path):
        return None
    path = Path(source)
    try:
        if is_hub_id(source):
            return _from_hub(AutoTokenizer, "tokenizer", str(source))
        if path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        if tokenizer is not None:
            raise
        logger.info("no tokenizer found beside {}: {}", path, err)
        return None

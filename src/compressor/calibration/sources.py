"""Calibration datasets named by a string or a path, as llm-compressor users pass them.

The rules (``resolve_dataset``), so that nothing is guessed:

- ``"self"``: text sampled from the model (kept as is for ``build_calibration_batches``);
- an existing file: ``.json``, ``.jsonl``, ``.csv`` or ``.parquet`` is loaded with
  ``datasets.load_dataset``; any other file is a text file (consecutive windows of its tokens);
- an existing directory: one written by ``Dataset.save_to_disk`` is loaded with
  ``datasets.load_from_disk``, any other with ``datasets.load_dataset`` (a folder of data files);
- a str that names nothing on disk and has the form of a Hugging Face Hub dataset id
  (``name`` or ``org/name``, no data-file suffix) is handed to ``datasets.load_dataset``;
- anything else (a ``pathlib.Path`` that does not exist, a str that is neither) is refused
  with both readings shown.

A dataset with several splits contributes its ``train`` split (or its only one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loguru import logger

from compressor.utils.hub import has_hub_id_form

__all__ = ["DATA_FILE_BUILDERS", "resolve_dataset"]

SELF = "self"
# file suffix -> the datasets builder that reads it; other files are read as text
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_PATH_LIKE_SUFFIXES = (*DATA_FILE_BUILDERS, ".txt", ".arrow")


def resolve_dataset(dataset: Any) -> Any:
    """``dataset`` with a str or ``pathlib.Path`` naming data turned into what
    ``build_calibration_batches`` takes (a ``datasets.Dataset``, a text file's Path, or
    ``"self"``); every other object is returned as it is.

    :param dataset: a str or Path by the rules above, or any calibration source
    :return: the calibration source
    """
    if isinstance(dataset, str) and dataset == SELF:
        return dataset
    if not isinstance(dataset, str | Path):
        return dataset
    path = Path(dataset)
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            return path  # a text file
        return _load(f"the {builder} file {path}", builder, data_files=str(path))
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            from datasets import load_from_disk

            logger.info("calibration dataset: loading {} (saved with save_to_disk)", path)
            return _one_split(load_from_disk(str(path)), str(path))
        return _load(f"the data files in {path}", str(path))
    if isinstance(dataset, Path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    if has_hub_id_form(dataset, file_suffixes=_PATH_LIKE_SUFFIXES):
        return _load(f"{dataset!r} from the Hugging Face Hub", dataset, hub=True)
    raise ValueError(
        f"dataset={dataset!r} is neither of the things a dataset string may be: as a path, "
        f"nothing exists at {path.absolute()}; as a Hugging Face Hub dataset id it is not one "
        "('name' or 'org/name', without a data-file suffix such as .txt or .json). Pass an "
        "existing file or directory, a Hub id, 'self', or a loaded datasets.Dataset"
    )


def _load(what: str, *args: Any, hub: bool = False, **kwargs: Any) -> Any:
    from datasets import load_dataset

    logger.info("calibration dataset: loading {}", what)
    try:
        loaded = load_dataset(*args, **kwargs)
    except (OSError, ValueError) as err:  # ConnectionError (offline) is an OSError
        reading = (
            f"no such local path ({Path(args[0]).absolute()}), so it was read as a Hub id; "
            if hub
            else ""
        )
        raise ValueError(f"dataset: loading {what} failed: {reading}{err}") from err
    return _one_split(loaded, what)


def _one_split(loaded: Any, what: str) -> Any:
    """The ``train`` split of a dataset with several (or its only one); a Dataset as is."""
    splits = getattr(loaded, "keys", None)
    if splits is None:
        return loaded
    names = list(splits())
    if "train" in names:
        chosen = "train"
    elif len(names) == 1:
        chosen = names[0]
    else:
        raise ValueError(
            f"dataset {what} has the splits {names} and none is 'train': load the split to "
            "calibrate on yourself and pass it as a datasets.Dataset"
        )
    if len(names) > 1:
        logger.info("calibration dataset: using the {!r} split of {}", chosen, names)
    return loaded[chosen]

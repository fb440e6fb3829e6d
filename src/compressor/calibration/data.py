"""Calibration data: whatever the user gives, turned into a list of model-ready batches.

Accepted sources: a ``datasets.Dataset`` (an ``input_ids`` or a ``text`` column), a list of
strings, a torch ``DataLoader``, ``"self"`` (text sampled from the model itself, for data-free
calibration), or a str or ``pathlib.Path`` naming data: a text file, a json/csv/parquet file,
a dataset directory or a Hub dataset id (``compressor.calibration.sources``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from tqdm.auto import tqdm

from compressor.calibration.arguments import CalibrationArguments
from compressor.calibration.checks import (
    MIN_TOKENS,
    check_token_ids,
    describe,
    drop_short_rows,
    warn_if_much_smaller,
)
from compressor.calibration.sources import resolve_dataset
from compressor.utils.threads import one_cpu_thread

__all__ = [
    "Batch",
    "TokenProgress",
    "build_calibration_batches",
    "collate",
    "read_text_file",
    "sample_from_model",
]

Batch = dict[str, torch.Tensor]


def build_calibration_batches(
    dataset: Any,
    args: CalibrationArguments,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
) -> list[Batch]:
    """Turn ``dataset`` into at most ``args.num_calibration_samples`` sequences, batched.

    :param dataset: a Dataset, a list of str, a DataLoader, "self", or a str or Path naming
        data (``resolve_dataset``)
    :param args: sample count, sequence length, batch size and seed
    :param model: the model, needed for ``"self"``
    :param tokenizer: needed for text (a list of str, a text file, a ``text`` column)
    :return: batches of ``input_ids`` (and ``attention_mask`` where padding was needed)
    :raises ValueError: when no row holds 2 tokens or more (rows under 2 tokens, such as
        empty text, are dropped with a warning), or a token id lies outside the model's
        vocabulary; a warning when the data holds under a tenth of the tokens requested
        (``num_calibration_samples`` x ``max_seq_length``)
    """
    dataset = resolve_dataset(dataset)  # a str or Path naming data, loaded
    if isinstance(dataset, str):  # "self"
        if model is None:
            raise ValueError("dataset='self' samples text from the model, but no model was given")
        return sample_from_model(model, args, tokenizer=tokenizer)
    batches = _batches(dataset, args, tokenizer)
    if model is not None:
        check_token_ids(batches, model)
    return batches


def _is_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` is a ``datasets.Dataset``, without importing ``datasets`` (slow to
    import) when nothing has: then no Dataset exists."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(dataset, module.Dataset)


def _batches(dataset: Any, args: CalibrationArguments, tokenizer: Any) -> list[Batch]:
    from torch.utils.data import DataLoader

    if isinstance(dataset, Path):
        sequences = _sequences_from_file(dataset, args, tokenizer)
    elif _is_dataset(dataset):
        sequences = _sequences_from_dataset(dataset, args, tokenizer)
    elif isinstance(dataset, DataLoader):
        return _batches_from_loader(dataset, args)
    elif isinstance(dataset, Sequence) and dataset and all(isinstance(s, str) for s in dataset):
        sequences = _tokenize(list(dataset[: args.num_calibration_samples]), args, tokenizer)
    else:
        raise TypeError(
            "dataset must be a datasets.Dataset, a list of str, a torch DataLoader, 'self', or "
            f"a str or pathlib.Path naming data; got {describe(dataset)}"
        )
    sequences = drop_short_rows(sequences, dataset)
    warn_if_much_smaller(sum(s.numel() for s in sequences), len(sequences), args)
    return collate(sequences, args.batch_size, _pad_id(tokenizer))


def read_text_file(path: Path) -> str:
    """The text of a UTF-8 file, or an error naming the file and where decoding failed.

    :param path: a text file
    :return: its text
    """
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); convert it to UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)"
        ) from None


def collate(sequences: Sequence[torch.Tensor], batch_size: int, pad_id: int = 0) -> list[Batch]:
    """Group 1-D token sequences into batches, right-padding to the longest in each batch.

    A batch gets an ``attention_mask`` only when it holds padding.
    """
    batches = []
    for start in range(0, len(sequences), batch_size):
        group = sequences[start : start + batch_size]
        longest = max(s.numel() for s in group)
        if all(s.numel() == longest for s in group):
            batches.append({"input_ids": torch.stack(list(group))})
            continue
        ids = torch.full((len(group), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, : seq.numel()] = seq
            mask[row, : seq.numel()] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@torch.no_grad()
def sample_from_model(
    model: torch.nn.Module, args: CalibrationArguments, *, tokenizer: Any = None
) -> list[Batch]:
    """Data-free calibration text: sequences sampled from the model itself (top-k 50).

    Each sequence starts from the beginning-of-sequence token and runs to
    ``max_seq_length`` tokens (end-of-sequence is suppressed). The caller's random state is
    left untouched; ``args.seed`` makes the samples reproducible.
    """
    generate: Any = getattr(model, "generate", None)
    if not callable(generate):
        raise TypeError(
            f"dataset='self' needs a model that can generate text; {type(model).__name__} cannot"
        )
    start_id = _bos_id(model, tokenizer)
    device = next(model.parameters()).device
    total, length = args.num_calibration_samples, args.max_seq_length
    # sample in large groups (generation is dominated by per-step overhead)
    group = max(args.batch_size, 16)
    sequences: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    # token by token, generation is many small operations: on one CPU thread it does not
    # stall when other processes share the cores (see compressor.utils.threads)
    threads = one_cpu_thread() if device.type == "cpu" else contextlib.nullcontext()
    try:
        with threads, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed)
            with tqdm(total=total * length, desc="sampling calibration text", unit="tok") as bar:
                for done in range(0, total, group):
                    count = min(group, total - done)
                    start = torch.full((count, 1), start_id, dtype=torch.long, device=device)
                    out = generate(
                        input_ids=start,
                        attention_mask=torch.ones_like(start),
                        do_sample=True,
                        top_k=50,
                        max_length=length,
                        min_length=length,
                        pad_token_id=start_id,
                        streamer=TokenProgress(bar, limit=(done + count) * length),
                    )
                    sequences.extend(row.cpu() for row in out)
    finally:
        model.train(was_training)
    logger.info("sampled {} calibration sequences of {} tokens from the model", total, length)
    return collate(sequences, args.batch_size)


class TokenProgress:
    """A ``generate`` streamer that advances a progress bar by every token generated (the
    prompt included), so that sampling shows progress token by token rather than per group.

    :param bar: the tqdm bar to advance
    :param limit: the bar position this generation ends at (it never passes it)
    """

    def __init__(self, bar: Any, limit: int) -> None:
        self.bar = bar
        self.limit = limit

    def put(self, value: torch.Tensor) -> None:
        self.bar.update(max(0, min(value.numel(), self.limit - self.bar.n)))

    def end(self) -> None:
        self.bar.update(max(0, self.limit - self.bar.n))


# ---------------------------------------------------------------- sources
def _sequences_from_file(path: Path, args: CalibrationArguments, tokenizer: Any) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    text = read_text_file(path)
    tokenize = _require_tokenizer(tokenizer, f"the text file {path}")
    ids = tokenize(text, return_tensors="pt")["input_ids"][0]
    length = args.max_seq_length
    # consecutive windows of the file; a short file gives one shorter sequence
    windows = [ids[i : i + length] for i in range(0, max(ids.numel() - length, 0) + 1, length)]
    return [w for w in windows[: args.num_calibration_samples] if w.numel() > 0]


_READ_COLUMNS = ("input_ids", "attention_mask", "text")
"""The dataset columns calibration reads; the others are named in a log line (a ``labels``
column, the raw columns a tokenizing ``map`` kept), ``loss_mask`` in a warning."""


def _sequences_from_dataset(dataset: Any, args: CalibrationArguments, tokenizer: Any) -> list:
    rows = dataset.select(range(min(len(dataset), args.num_calibration_samples)))
    columns = list(dataset.column_names)
    _say_unread_columns(columns)
    if "input_ids" in columns:
        masks = rows["attention_mask"] if "attention_mask" in columns else None
        sequences = []
        for position, row in enumerate(rows["input_ids"]):
            ids = torch.as_tensor(row, dtype=torch.long)
            if masks is not None:
                ids = _unpadded(ids, torch.as_tensor(masks[position]), position)
            sequences.append(ids[: args.max_seq_length])
        return sequences
    if "text" in columns:
        return _tokenize(list(rows["text"]), args, tokenizer)
    raise ValueError(
        f"dataset columns are {dataset.column_names}; expected an 'input_ids' or a 'text' column"
    )


def _say_unread_columns(columns: list[str]) -> None:
    unread = [c for c in columns if c not in _READ_COLUMNS]
    if "input_ids" in columns and "text" in columns:
        unread.append("text")  # the token ids are used
    if "loss_mask" in unread:
        logger.warning(
            "the dataset's 'loss_mask' column is not used: every token of each row calibrates "
            "(llm-compressor's AWQ restricts its loss to the masked tokens; not supported here)"
        )
    others = [c for c in unread if c != "loss_mask"]
    if others:
        logger.info("dataset column(s) {} are not used for calibration", others)


def _unpadded(ids: torch.Tensor, mask: torch.Tensor, position: int) -> torch.Tensor:
    """A dataset row's tokens where its ``attention_mask`` is 1 (padding on either side
    removed): a padded row would otherwise calibrate on its pad tokens.

    :raises ValueError: the mask's shape is not the row's, or its ones are not contiguous
    """
    if mask.shape != ids.shape:
        raise ValueError(
            f"dataset row {position}: attention_mask has shape {tuple(mask.shape)}, input_ids "
            f"{tuple(ids.shape)}; they must match"
        )
    kept = mask.nonzero().flatten()
    if kept.numel() == ids.numel():
        return ids
    if kept.numel() == 0:
        raise ValueError(f"dataset row {position}: its attention_mask is all zeros")
    first, last = int(kept[0]), int(kept[-1])
    if last - first + 1 != kept.numel():
        raise ValueError(
            f"dataset row {position}: its attention_mask has zeros between ones; calibration "
            "takes padding at either end of a row only (drop the row or its inner padding)"
        )
    return ids[first : last + 1]


def _batches_from_loader(loader: Iterable[Any], args: CalibrationArguments) -> list[Batch]:
    batches: list[Batch] = []
    seen = tokens = 0
    for position, batch in enumerate(loader):
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        elif isinstance(batch, Mapping):
            batch = dict(batch)
        else:
            raise TypeError(
                f"DataLoader batch {position} is a {type(batch).__name__}; expected a tensor of "
                "input_ids or a mapping such as {'input_ids': ..., 'attention_mask': ...}"
            )
        if "input_ids" not in batch:
            raise ValueError(f"DataLoader batch {position} has no 'input_ids': {sorted(batch)}")
        ids = batch["input_ids"]
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() == 2:
            if ids.shape[-1] < MIN_TOKENS:
                raise ValueError(
                    f"DataLoader batch {position} holds sequences of {ids.shape[-1]} token(s); "
                    f"calibration needs {MIN_TOKENS} or more per row"
                )
            tokens += ids.numel()
        batches.append(batch)
        seen += len(batch["input_ids"])
        if seen >= args.num_calibration_samples:
            break
    if not batches:
        raise ValueError("the DataLoader yielded no batches")
    if tokens:
        warn_if_much_smaller(tokens, seen, args)
    return batches


def _tokenize(texts: list[str], args: CalibrationArguments, tokenizer: Any) -> list:
    tokenize = _require_tokenizer(tokenizer, "text data")
    return [
        torch.as_tensor(
            tokenize(text, truncation=True, max_length=args.max_seq_length)["input_ids"],
            dtype=torch.long,
        )
        for text in texts
    ]


# ---------------------------------------------------------------- helpers
def _require_tokenizer(tokenizer: Any, what: str) -> Any:
    if tokenizer is None:
        raise ValueError(
            f"{what} must be tokenized, but no tokenizer was given and none was found beside "
            "the model: pass tokenizer=..."
        )
    return tokenizer


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _bos_id(model: torch.nn.Module, tokenizer: Any) -> int:
    config = getattr(model, "config", None)
    for source in (tokenizer, getattr(model, "generation_config", None), config):
        for name in ("bos_token_id", "decoder_start_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int):
                return value
    logger.warning("no beginning-of-sequence token known; sampling from token id 0")
    return 0

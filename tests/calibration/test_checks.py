"""Calibration data is checked when the batches are built: rows too short to calibrate on,
data much smaller than requested, token ids outside the vocabulary, files that are not UTF-8."""

import pytest
import torch
from datasets import Dataset
from loguru import logger
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from calibration_modifiers import FailAtLayer
from compressor import oneshot
from compressor.calibration.arguments import CalibrationArguments
from compressor.calibration.data import build_calibration_batches


@pytest.fixture
def warnings():
    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    yield messages
    logger.remove(handle)


@pytest.fixture(scope="module")
def tokenizer(stories_model_path):
    return AutoTokenizer.from_pretrained(stories_model_path)


def test_empty_text_is_refused(tmp_path, tokenizer):
    args = CalibrationArguments(max_seq_length=16)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for source in (empty, ["", ""], Dataset.from_dict({"text": ["", ""]})):
        with pytest.raises(ValueError, match="no row of 2 tokens or more.*empty text"):
            build_calibration_batches(source, args, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="sequences of 1 token.*2 or more"):
        build_calibration_batches(DataLoader(torch.ones(4, 1, dtype=torch.long)), args)


def test_empty_rows_among_real_ones_are_dropped_with_a_warning(tokenizer, warnings):
    args = CalibrationArguments(num_calibration_samples=4, max_seq_length=8)
    texts = ["Once upon a time there was a cat.", "", "The dog ran home.", ""]
    batches = build_calibration_batches(Dataset.from_dict({"text": texts}), args,
                                        tokenizer=tokenizer)  # fmt: skip
    assert len(batches) == 2 and all(b["input_ids"].shape[1] >= 2 for b in batches)
    assert any("dropped 2 of 4 calibration row(s) with fewer than 2 tokens" in m for m in warnings)


def test_data_much_smaller_than_requested_is_warned_about(tokenizer, warnings):
    build_calibration_batches(["The dog ran home."], CalibrationArguments(), tokenizer=tokenizer)
    assert any("under a tenth of the 131072 requested" in m for m in warnings)
    warnings.clear()
    rows = ["Once upon a time there was a cat who liked the sun."] * 4
    build_calibration_batches(rows, CalibrationArguments(num_calibration_samples=4,
                              max_seq_length=8), tokenizer=tokenizer)  # fmt: skip
    assert warnings == []


def test_a_file_that_is_not_utf8_is_refused_by_name(tmp_path, tokenizer):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Café au lait, déjà vu.".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(byte 3"):
        build_calibration_batches(latin, CalibrationArguments(), tokenizer=tokenizer)


def test_token_ids_outside_the_vocabulary_are_refused_before_calibration(tiny_llama):
    rows = [list(range(10)), [1, 2, 500, 3]]  # the tiny Llama has 128 tokens
    failing = FailAtLayer(layer=0)
    with pytest.raises(
        ValueError, match="batch 1 holds token id 500, outside .* vocabulary of 128"
    ):
        oneshot(tiny_llama, [failing], Dataset.from_dict({"input_ids": rows}))
    assert failing._events == []  # calibration never started
    negative = DataLoader(torch.tensor([[3, -1, 4]]))
    with pytest.raises(ValueError, match="token id -1"):
        build_calibration_batches(negative, CalibrationArguments(), model=tiny_llama)

"""Calibration datasets named by a string or a path (``resolve_dataset``)."""

import json

import pytest
from datasets import Dataset, DatasetDict

from compressor.calibration.sources import resolve_dataset

ROWS = [{"text": f"Row {i}: once upon a time there was a story."} for i in range(5)]


def test_local_data_files_go_through_load_dataset(tmp_path):
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for source in (str(jsonl), jsonl):  # a str naming an existing file is that file
        loaded = resolve_dataset(source)
        assert isinstance(loaded, Dataset) and loaded["text"] == [r["text"] for r in ROWS]
    csv = tmp_path / "calib.csv"
    csv.write_text("text\n" + "".join(r["text"].replace(",", "") + "\n" for r in ROWS))
    assert len(resolve_dataset(str(csv))) == 5


def test_a_text_file_stays_a_text_file(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("plain prose")
    assert resolve_dataset(str(text)) == text  # read later as consecutive token windows


def test_a_saved_dataset_directory_and_a_folder_of_data_files(tmp_path):
    splits = DatasetDict(
        {"train": Dataset.from_list(ROWS), "validation": Dataset.from_list(ROWS[:2])}
    )
    splits.save_to_disk(str(tmp_path / "saved"))
    loaded = resolve_dataset(str(tmp_path / "saved"))
    assert isinstance(loaded, Dataset) and len(loaded) == 5  # the train split
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    assert len(resolve_dataset(str(folder))) == 3
    only_test = DatasetDict({"a": Dataset.from_list(ROWS), "b": Dataset.from_list(ROWS)})
    only_test.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match=r"has the splits \['a', 'b'\] and none is 'train'"):
        resolve_dataset(str(tmp_path / "two"))


def test_what_is_neither_a_path_nor_a_hub_id_is_refused_with_both_readings(tmp_path):
    missing = tmp_path / "calib.json"
    with pytest.raises(ValueError) as info:
        resolve_dataset(str(missing))
    assert f"nothing exists at {missing}" in str(info.value)
    assert "as a Hugging Face Hub dataset id it is not one" in str(info.value)
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        resolve_dataset(missing)  # a pathlib.Path is always a path
    assert resolve_dataset("self") == "self"


def test_a_hub_id_goes_to_load_dataset_with_a_clear_error_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as info:
        resolve_dataset("some-org/calibration-set")
    message = str(info.value)
    assert "'some-org/calibration-set' from the Hugging Face Hub failed" in message
    assert "so it was read as a Hub id" in message

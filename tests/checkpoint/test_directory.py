"""The output directory: what overwrite replaces, where a checkpoint is written, its mode, and
recovery from a save that was killed."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compressor import Recipe
from compressor.checkpoint import directory as saving
from compressor.checkpoint.swap import make_partial_dir, swap_into_place

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def small_model():
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)).eval()


@pytest.fixture
def logs():
    """The messages logged (INFO and up) while the test runs, one string."""
    from loguru import logger

    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(str(m)), level="INFO")

    class Text:
        @property
        def text(self) -> str:
            return "".join(messages)

    yield Text()
    logger.remove(handle)


def _save(model, out, overwrite=False):
    return saving.save_checkpoint(model, out, Recipe.from_modifiers([]), overwrite=overwrite)


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(small_model, tmp_path):
    models = tmp_path / "models"
    (models / "other").mkdir(parents=True)
    (models / "notes.txt").write_text("notes")
    with pytest.raises(FileExistsError, match=r"holds 2 entries \(notes.txt, other\).*not a check"):
        _save(small_model, models, overwrite=True)
    assert sorted(os.listdir(models)) == ["notes.txt", "other"]
    assert os.listdir(tmp_path) == ["models"]


def test_overwrite_replaces_a_checkpoint_or_an_empty_directory(small_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _save(small_model, empty, overwrite=True)
    assert (empty / "config.json").is_file()
    (empty / "extra.txt").write_text("from the last run")  # a checkpoint with a file added
    _save(small_model, empty, overwrite=True)
    assert not (empty / "extra.txt").exists() and (empty / "recipe.yaml").is_file()
    card_only = tmp_path / "card"
    card_only.mkdir()
    (card_only / "README.md").write_text(
        (empty / "README.md").read_text()
    )  # our model card marks a checkpoint; another README does not
    assert saving.is_checkpoint(card_only)
    (card_only / "README.md").write_text("# My notes\n\nProduced by hand.\n")
    assert not saving.is_checkpoint(card_only)


def test_an_unwritable_location_is_refused_before_anything_is_written(small_model, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="a_file is a file"):
        saving.check_output_dir(blocker / "sub" / "ckpt", overwrite=False)
    try:
        os.mkdir("/sys/compressor-write-check")
    except OSError:
        with pytest.raises(PermissionError, match="cannot write in /sys.*location you can write"):
            saving.check_output_dir(Path("/sys/compressor-test/ckpt"), overwrite=False)


def test_a_checkpoint_directory_follows_the_umask(small_model, tmp_path):
    previous = os.umask(0o022)
    try:
        out = _save(small_model, tmp_path / "ckpt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_a_replaced_checkpoint_keeps_its_mode(small_model, tmp_path):
    out = _save(small_model, tmp_path / "ckpt")
    os.chmod(out, 0o750)
    _save(small_model, out, overwrite=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750


def test_a_symlinked_output_dir_is_written_through_the_link(small_model, tmp_path):
    real = tmp_path / "storage" / "ckpt"
    link = tmp_path / "ckpt"
    link.symlink_to(real)  # dangling: the first save creates the target
    _save(small_model, link)
    assert link.is_symlink() and (real / "config.json").is_file()
    _save(small_model, link, overwrite=True)
    assert link.is_symlink() and (real / "config.json").is_file()
    assert sorted(os.listdir(tmp_path / "storage")) == ["ckpt"]


_KILLED_SAVE = """
import os, signal, sys, torch
from transformers import LlamaForCausalLM, LlamaConfig
from compressor import Recipe
from compressor.checkpoint import directory as saving, swap

def die_after_write(model, directory, recipe, tokenizer, compressed, decompress):
    (directory / "model.safetensors").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)

real_rename = os.rename
renames = []

def die_between_renames(src, dst):
    renames.append(src)
    if len(renames) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst)

if sys.argv[2] == "write":
    saving._write = die_after_write
else:
    swap.os.rename = die_between_renames
config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
saving.save_checkpoint(LlamaForCausalLM(config), sys.argv[1], Recipe.from_modifiers([]),
                       overwrite=True)
"""


def _killed_save(out: Path, where: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLED_SAVE), str(out), where],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr


def test_the_next_run_removes_a_killed_saves_partial_directory(small_model, tmp_path, logs):
    out = tmp_path / "ckpt"
    _killed_save(out, "write")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".ckpt.partial-")]  # left behind
    _save(small_model, out)
    assert os.listdir(tmp_path) == ["ckpt"]
    assert "removed unfinished checkpoint" in logs.text


def test_a_save_killed_between_the_renames_leaves_the_old_checkpoint_restorable(
    small_model, tmp_path, logs
):
    out = _save(small_model, tmp_path / "ckpt")
    (out / "marker.txt").write_text("the old checkpoint")
    _killed_save(out, "rename")
    assert not out.exists()
    previous = [n for n in os.listdir(tmp_path) if n.startswith(".ckpt.previous-")]
    assert len(previous) == 1  # the old checkpoint, findable beside the target
    assert (tmp_path / previous[0] / "marker.txt").read_text() == "the old checkpoint"
    with pytest.raises(FileExistsError, match="already exists"):  # restored, so refused
        _save(small_model, out)
    assert (out / "marker.txt").read_text() == "the old checkpoint"
    assert "restored" in logs.text
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_leftovers_of_a_save_that_still_runs_are_left_alone(tmp_path):
    target = tmp_path / "ckpt"
    partial = make_partial_dir(target)  # this process's: still running
    saving.check_output_dir(target, overwrite=False)
    assert partial.is_dir()
    swap_into_place(partial, target)
    assert os.listdir(tmp_path) == ["ckpt"]


class _WatchesTheSave:
    """A tokenizer for save_checkpoint that records where it is asked to save (the partial
    directory) and can run an action there, as another process would meanwhile."""

    def __init__(self, meanwhile=None):
        self.saved_to: list[Path] = []
        self.meanwhile = meanwhile

    def save_pretrained(self, directory):
        directory = Path(directory)
        self.saved_to.append(directory)
        (directory / "tokenizer_config.json").write_text("{}")
        if self.meanwhile is not None:
            self.meanwhile()


def test_the_checkpoint_is_written_beside_the_output_and_holds_its_recipe(small_model, tmp_path):
    """The partial directory must sit on the output's file system (beside it), where renaming
    it into place is atomic; the system temp directory may be another file system."""
    from compressor.modifiers.quantization import QuantizationModifier

    out = tmp_path / "runs" / "day1" / "ckpt"  # two parents missing
    recipe = Recipe.from_modifiers([QuantizationModifier(scheme="W8A8", ignore=["lm_head"])])
    watcher = _WatchesTheSave()
    saving.save_checkpoint(small_model, out, recipe, watcher, save_compressed=False)
    (partial,) = watcher.saved_to
    assert partial.parent == out.parent and partial.name.startswith(".ckpt.partial-")
    assert not partial.exists() and (out / "tokenizer_config.json").is_file()
    assert Recipe.from_file(out / "recipe.yaml") == recipe
    assert os.listdir(out.parent) == ["ckpt"]


def test_an_existing_output_is_refused_before_anything_is_written(small_model, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    watcher = _WatchesTheSave()
    with pytest.raises(FileExistsError, match="already exists"):
        saving.save_checkpoint(small_model, out, Recipe.from_modifiers([]), watcher)
    assert watcher.saved_to == []  # refused before the model was written
    assert os.listdir(out) == ["notes.txt"]


def test_an_output_created_during_the_save_is_not_replaced(small_model, tmp_path):
    """Another process may create output_dir while this save writes: the check is made again
    just before the swap, so its files are never moved aside and removed."""
    out = tmp_path / "ckpt"

    def another_process_saves_there():
        out.mkdir()
        (out / "theirs.txt").write_text("their work")

    watcher = _WatchesTheSave(meanwhile=another_process_saves_there)
    with pytest.raises(FileExistsError, match="already exists"):
        saving.save_checkpoint(small_model, out, Recipe.from_modifiers([]), watcher)
    assert len(watcher.saved_to) == 1
    assert os.listdir(out) == ["theirs.txt"]
    assert os.listdir(tmp_path) == ["ckpt"]  # the partial directory is gone too


def test_output_arguments_default_to_a_compressed_save_that_replaces_nothing():
    from pydantic import ValidationError

    args = saving.OutputArguments(output_dir="out")
    assert args.output_dir == Path("out")
    assert args.save_compressed is True and args.overwrite is False
    assert saving.OutputArguments().output_dir is None  # nothing is saved
    with pytest.raises(ValidationError, match="overwrit"):
        saving.OutputArguments(output_dir="out", overwrit=True)

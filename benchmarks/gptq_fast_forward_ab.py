"""A/B of GPTQ's fast calibration forward (issue 20): SmoothQuant 0.8 then GPTQ W8A8 static
(``ours/smoothquant_gptq_w8a8_static.yaml``) on SmolLM2-135M, 16 x 512 calibration tokens from
the start of WikiText-2 test, two torch threads, with GPTQ's modules on the fast quantized
forward (``on``, the library) or on compressed-tensors' own (``off``). One process per side;
prints the compress phase's wall and CPU seconds, the process's peak RSS and a checksum of one
quantized weight (equal on both sides: the forward is bit-identical).

Usage::

    PYTHONPATH=src:. python -m benchmarks.gptq_fast_forward_ab on
    PYTHONPATH=src:. python -m benchmarks.gptq_fast_forward_ab off
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import calibration_dataset, calibration_ids
from benchmarks.models import WIKITEXT, smollm2_package_dir

RECIPE = Path(__file__).parent / "recipes" / "ours" / "smoothquant_gptq_w8a8_static.yaml"


def main() -> None:
    side = sys.argv[1] if len(sys.argv) > 1 else "on"
    if side not in ("on", "off"):
        raise SystemExit("usage: python -m benchmarks.gptq_fast_forward_ab on|off")
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compressor.modifiers.quantization.calibration_forward as calibration_forward
    from compressor import oneshot
    from compressor.entrypoints.loading import gguf_checkpoint

    if side == "off":  # GPTQ's modules keep compressed-tensors' forward (no other modifier
        # of this recipe installs it)
        calibration_forward.CalibrationForwards.install = lambda self, modules: 0  # type: ignore[method-assign]
    fast = []
    real = calibration_forward.fake_quantize_int

    def counted(*args, **kwargs):
        fast.append(1)
        return real(*args, **kwargs)

    calibration_forward.fake_quantize_int = counted
    gguf = smollm2_package_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = gguf_checkpoint(gguf, "build/gguf")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = {"file": str(WIKITEXT), "samples": 16, "seq_len": 512}
    rows = calibration_ids(tokenizer, spec)
    wall, cpu = time.perf_counter(), time.process_time()
    oneshot(model=model, recipe=yaml.safe_load(RECIPE.read_text()),
            dataset=calibration_dataset(rows), tokenizer=tokenizer,
            num_calibration_samples=len(rows), max_seq_length=512)  # fmt: skip
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    checksum = float(model.model.layers[5].mlp.down_proj.weight.double().sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"{side}: compress {wall:.2f} s wall, {cpu:.2f} s CPU, peak {peak} MB, "
          f"checksum {checksum!r}, fast-path calls {len(fast)}")  # fmt: skip


if __name__ == "__main__":
    main()

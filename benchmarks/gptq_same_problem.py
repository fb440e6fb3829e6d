"""Our GPTQ solver against llm-compressor's on the very same weights and Hessians.

End-to-end perplexities of the two sides differ by GPTQ's rounding spread (see
``benchmarks.order_spread``); this separates the solver from everything before it. Each
problem (a weight, a Hessian of heavy-tailed inputs, int4 symmetric groups of 64, static
activation order, block 128, dampening 0.01) is solved by ours here and by llm-compressor's
``quantize_weight`` in its own venv (``make bench-peers-setup``), with our scales::

    python -m benchmarks.gptq_same_problem

It prints, per problem, the share of identical quantized weights and the ratio of the two
GPTQ objectives ``tr((W - Q) H (W - Q)^T)``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import side_python

SHAPES = [(576, 576), (1536, 576), (576, 1536), (192, 576)]

PEER = """
import sys, torch
from compressed_tensors.quantization import QuantizationArgs
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
problems = torch.load(sys.argv[1])
args = QuantizationArgs(num_bits=4, strategy="group", group_size=64, symmetric=True,
                        actorder="weight")
out = []
for p in problems:
    q, _, _ = quantize_weight(p["w"][None].clone(), p["h"][None].clone(), p["scale"][None],
                              p["zp"][None], None, args, blocksize=128, percdamp=0.01)
    out.append(q[0])
torch.save(out, sys.argv[2])
"""


def main() -> int:
    import torch
    from compressed_tensors.quantization import QuantizationArgs

    from compressor.modifiers.quantization.gptq import accumulate_hessian, gptq_quantize_weight

    python = side_python("llmcompressor")
    if python is None:
        print("llm-compressor's venv is absent: run `make bench-peers-setup` first")
        return 1
    gen = torch.Generator().manual_seed(0)
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=64, symmetric=True)
    problems = []
    for index in range(2 * len(SHAPES)):
        rows, cols = SHAPES[index % len(SHAPES)]
        feature_scale = torch.randn(cols, generator=gen).abs() ** 3 + 0.05
        hessian, _ = accumulate_hessian(torch.randn(4096, cols, generator=gen) * feature_scale)
        weight = torch.randn(rows, cols, generator=gen) * 0.05
        ours = gptq_quantize_weight(weight, hessian, args, actorder="static")
        problems.append(
            {
                "w": weight,
                "h": hessian,
                "q": ours.weight,
                "scale": ours.scale,
                "zp": ours.zero_point,
            }  # fmt: skip
        )
    with tempfile.TemporaryDirectory() as work:
        given, taken = Path(work) / "problems.pt", Path(work) / "peer.pt"
        torch.save(problems, given)
        subprocess.run([str(python), "-c", PEER, str(given), str(taken)], check=True)
        theirs = torch.load(taken)
    for index, (problem, peer_q) in enumerate(zip(problems, theirs, strict=True)):
        h = problem["h"].double()

        def objective(q: torch.Tensor, problem: dict = problem, h: torch.Tensor = h) -> float:
            d = (problem["w"] - q).double()
            return float(torch.einsum("ij,jk,ik->", d, h, d))

        same = (problem["q"] == peer_q).float().mean().item()
        ratio = objective(problem["q"]) / objective(peer_q)
        shape = tuple(problem["w"].shape)
        print(
            f"problem {index} {shape}: identical weights {same:.4f}, objective ours/peer {ratio:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

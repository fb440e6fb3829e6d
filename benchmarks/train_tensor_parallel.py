"""Compression-aware training on one process against two tensor-parallel ranks (gloo): the loss
curves side by side and the time per step.

A Llama of 2 layers (hidden 256, MLP 1024, 8 heads, 4 key/value heads, vocabulary 1024) trains
with 50% unstructured l1 masks (ramped over the first half of the steps) and weight QAT (per
channel on q/k/o, per tensor on v, groups of 16 on the MLP), SGD, on seeded random tokens. The
two-rank run splits q/k/v/gate/up by output rows (``ColwiseParallel``) and o/down by input
columns (``RowwiseParallel``); every rank sees the same rows.

    python -m benchmarks.train_tensor_parallel               # the tables, in Markdown
    python -m benchmarks.train_tensor_parallel --steps 5     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

PROJECTIONS = ["re:.*_proj$"]
BITS = (0, 8, 4)  # 0: no modifiers
LABELS = {"0": "no modifiers", "8": "8-bit QAT + masks", "4": "4-bit QAT + masks"}


def _model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def _recipe(bits: int, steps: int) -> list:
    """QAT at ``bits`` and the masks; no modifiers at all when ``bits`` is 0."""
    from compressor.modifiers import QuantizationModifier, SparsePruningModifier

    if not bits:
        return []

    def weights(strategy: str, **extra) -> dict:
        return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, **extra}

    groups = {
        "attention": {"targets": ["re:.*self_attn\\.(q|k|o)_proj$"], "weights": weights("channel")},
        "values": {"targets": ["re:.*self_attn\\.v_proj$"], "weights": weights("tensor")},
        "mlp": {
            "targets": ["re:.*mlp\\.(gate|up|down)_proj$"],
            "weights": weights("group", group_size=16),
        },
    }
    return [
        SparsePruningModifier(
            density=0.5, init_density=0.75, start=0, end=steps // 2, update=1, targets=PROJECTIONS
        ),
        QuantizationModifier(config_groups=groups, start=0),
    ]


def _parallelize(net: torch.nn.Module, mesh) -> None:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan: dict = {}
    for index in range(len(net.model.layers)):
        layer = f"model.layers.{index}"
        plan.update({f"{layer}.self_attn.{p}_proj": ColwiseParallel() for p in "qkv"})
        plan[f"{layer}.self_attn.o_proj"] = RowwiseParallel()
        plan.update({f"{layer}.mlp.{p}_proj": ColwiseParallel() for p in ("gate", "up")})
        plan[f"{layer}.mlp.down_proj"] = RowwiseParallel()
    parallelize_module(net, mesh, plan)


def _train(bits: int, args: argparse.Namespace, mesh=None) -> dict:
    from compressor import CompressionSession

    net = _model()
    if mesh is not None:
        _parallelize(net, mesh)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2)
    session = CompressionSession()
    recipe = _recipe(bits, args.steps)
    session.initialize(model=net, recipe=recipe, optimizer=optimizer)
    data = torch.randint(
        0, 1024, (args.steps, args.batch, args.seq), generator=torch.Generator().manual_seed(1)
    )
    losses, walls, cpus = [], [], []
    for ids in data:
        began, cpu = time.perf_counter(), time.process_time()
        session.batch_start()
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.batch_end()
        losses.append(loss.item())
        walls.append(time.perf_counter() - began)
        cpus.append(time.process_time() - cpu)
    masks = [m.tolist() for r in recipe for m in getattr(r, "_masks", {}).values()]
    session.finalize()
    return {"losses": losses, "wall": walls, "cpu": cpus, "masks": masks}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = {bits: _train(bits, args, mesh) for bits in BITS}
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _unlike(masks: list, expected: list[torch.Tensor]) -> int:
    """How many mask entries differ from ``expected``'s."""
    pairs = zip(masks, expected, strict=True)
    return sum(int((torch.tensor(mask) != other).sum()) for mask, other in pairs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    alone = {str(bits): _train(bits, args) for bits in BITS}
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(2, _free_port(), args, out), nprocs=2,
                           start_method="spawn")  # fmt: skip
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    print(f"QAT + 50% l1 masks, {args.steps} SGD steps of {args.batch} x {args.seq} tokens, "
          "1 thread per process\n")  # fmt: skip
    keys = [str(bits) for bits in BITS]
    print("| step | " + " | ".join(
        f"{LABELS[k]}: 1 process | 2 ranks | difference" for k in keys
    ) + " |")  # fmt: skip
    print("|---" * (1 + 3 * len(keys)) + "|")
    for step in range(args.steps):
        cells = []
        for bits in keys:
            one, two = alone[bits]["losses"][step], ranks[0][bits]["losses"][step]
            cells.append(f"{one:.6f} | {two:.6f} | {two - one:+.1e}")
        print(f"| {step} | " + " | ".join(cells) + " |")
    print(
        "\n| run | wall s per step (median) | CPU s per step per rank (median) | "
        "final mask entries unlike 1 process (per rank) |"
    )
    print("|---|---|---|---|")
    for bits in keys:
        expected = [torch.tensor(m) for m in alone[bits]["masks"]]
        runs = {"1 process": [alone[bits]], "2 ranks": [r[bits] for r in ranks]}
        for label, results in runs.items():
            wall = statistics.median(max(r["wall"][s] for r in results) for s in range(args.steps))
            cpu = ", ".join(f"{statistics.median(r['cpu']):.3f}" for r in results)
            unlike = ", ".join(str(_unlike(r["masks"], expected)) for r in results)
            print(f"| {LABELS[bits]}, {label} | {wall:.3f} | {cpu} | {unlike or '-'} |")


if __name__ == "__main__":
    main()

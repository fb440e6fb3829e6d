"""Compression-aware training under tensor parallelism: a tiny Llama whose attention and MLP
projections are split over two gloo processes with torch's ``parallelize_module``
(``ColwiseParallel`` on q/k/v/gate/up, ``RowwiseParallel`` on o/down) trains with
quantization-aware training and pruning masks as it does in one process; the session's
finalize gathers it, and rank 0's checkpoint reloads in one process with the same logits."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_llama_config

STEPS, ROWS, SEQ = 6, 4, 16

# 8-bit weights per output channel on q/k/o (local under ColwiseParallel, reduced over the
# ranks on o), per tensor on v (reduced), in groups of 16 columns on the MLP (local:
# down_proj's 64 input columns are split 32 / 32); symmetric, so that transformers reloads
# the checkpoint. (At 4 bits the runs part at the first weight that rounds the other way
# after a last-bit difference: see TRAINED below.)
CHANNEL = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
TENSOR = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor"}
GROUP = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "group_size": 16}
QAT_GROUPS = {
    "attention": {"targets": ["re:.*self_attn\\.(q|k|o)_proj$"], "weights": CHANNEL},
    "values": {"targets": ["re:.*self_attn\\.v_proj$"], "weights": TENSOR},
    "mlp": {"targets": ["re:.*mlp\\.(gate|up|down)_proj$"], "weights": GROUP},
}
# every strategy at 4 and 8 bits, symmetric (the fused path for channel and tensor) and
# asymmetric (compressed-tensors' general path)
SCHEMES = {
    f"{key}{bits}{'' if symmetric else '_asym'}": {**args, "num_bits": bits, "symmetric": symmetric}
    for key, args in (("channel", CHANNEL), ("tensor", TENSOR), ("group", GROUP))
    for bits in (4, 8)
    for symmetric in (True, False)
}
PROJECTIONS = ["re:.*_proj$"]


def qat_and_sparse() -> list:
    """50% unstructured l1 masks (ramped from 75% over three steps), then QAT."""
    from compressor.modifiers import QuantizationModifier, SparsePruningModifier

    return [
        SparsePruningModifier(
            density=0.5, init_density=0.75, start=0, end=3, update=1, targets=PROJECTIONS
        ),
        QuantizationModifier(config_groups=QAT_GROUPS, start=0),
    ]


def rows_and_heads() -> list:
    """Half the MLP rows and half the key-value heads, chosen during training."""
    from compressor.modifiers import HeadPruningModifier, RowPruningModifier

    return [
        RowPruningModifier(density=0.5, start=0, end=2, update=1),
        HeadPruningModifier(density=0.5, start=0, end=2, update=1),
    ]


def distilled(mesh=None) -> torch.Tensor:
    """The losses of a student (the tiny Llama, perturbed) distilled from a teacher that stays
    whole on every rank: logits and every layer's output."""
    from compressor import CompressionSession
    from compressor.modifiers import OutputDistillationModifier

    teacher = model().eval()
    net = model().train()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for param in net.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    if mesh is not None:
        parallelize(net, mesh)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2)
    session = CompressionSession()
    recipe = [OutputDistillationModifier(hardness=0.5, hidden_weight=1.0, start=0)]
    session.initialize(model=net, recipe=recipe, optimizer=optimizer, teacher_model=teacher)
    losses = []
    for ids in data():
        session.batch_start(batch_data={"input_ids": ids})
        loss = session.loss_calculated(net(input_ids=ids, labels=ids).loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.batch_end()
        losses.append(loss.item())
    session.finalize()
    return torch.tensor(losses)


def model() -> torch.nn.Module:
    """The tiny Llama in float64: the ranks add partial products in another order than one
    process, and in float32 such a last-bit difference can round a fake-quantized weight the
    other way during training, after which the runs drift apart by an amount that depends on
    the CPU's kernels (up to 7e-4 in the logits on an AVX2 machine); in float64 a rounding
    tie that close is too rare to meet."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).to(torch.float64)


def data() -> torch.Tensor:
    return torch.randint(0, 128, (STEPS, ROWS, SEQ), generator=torch.Generator().manual_seed(1))


def parallelize(net: torch.nn.Module, mesh) -> None:
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


def train(recipe: list, mesh=None) -> tuple[torch.nn.Module, dict]:
    """Train ``model()`` with ``recipe`` for STEPS steps of SGD (every rank on the same rows;
    split over ``mesh`` when given); the finalized model, the losses and the held masks."""
    from compressor import CompressionSession

    net = model().train()
    if mesh is not None:
        parallelize(net, mesh)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2)
    session = CompressionSession()
    session.initialize(model=net, recipe=recipe, optimizer=optimizer)
    losses = []
    for ids in data():
        session.batch_start()
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.batch_end()
        losses.append(loss.item())
    masks = {
        f"{i}.{index}": mask.clone()
        for i, modifier in enumerate(recipe)
        for index, mask in getattr(modifier, "_masks", {}).items()
    }
    session.finalize()
    return net.eval(), {"losses": torch.tensor(losses), "masks": masks}


def shape_of(net: torch.nn.Module) -> tuple[int, int, int]:
    """The MLP width and the number of heads and key-value heads, in the config and weights."""
    config, layer = net.config, net.model.layers[0]
    assert layer.mlp.down_proj.weight.shape[1] == config.intermediate_size
    assert layer.self_attn.k_proj.weight.shape[0] == config.num_key_value_heads * 8
    return config.intermediate_size, config.num_attention_heads, config.num_key_value_heads


def state_of(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@torch.no_grad()
def fake_quantized_alike(mesh) -> dict[str, bool]:
    """For every scheme and every split projection of a parallelised model, whether the
    fake-quantized DTensor weight, gathered, is bit for bit the fake-quantized whole weight."""
    from compressed_tensors.quantization import QuantizationArgs

    from compressor.modifiers.quantization.fake_quant import WeightFakeQuantizer

    whole = model()
    split = model()
    parallelize(split, mesh)
    alike = {}
    for name, module in split.named_modules():
        if not name.endswith("_proj"):
            continue
        reference = whole.get_submodule(name).weight
        for key, args in SCHEMES.items():
            quantize = WeightFakeQuantizer(QuantizationArgs(**args), where=name)
            sharded = quantize(module.weight).full_tensor()
            alike[f"{name} {key}"] = torch.equal(sharded, quantize(reference))
    alike.update(activations_alike(mesh))
    return alike


@torch.no_grad()
def activations_alike(mesh) -> dict[str, bool]:
    """Activations split along their features (a RowwiseParallel Linear's input): dynamic
    per-token and static per-tensor fake quantization, gathered, against the whole tensor's."""
    from compressed_tensors.quantization import QuantizationArgs
    from torch.distributed.tensor import Shard, distribute_tensor

    from compressor.modifiers.quantization.fake_quant import ActivationFakeQuantizer
    from compressor.modifiers.quantization.observers import RangeObserver

    x = torch.randn(4, SEQ, 64, generator=torch.Generator().manual_seed(3))
    split = distribute_tensor(x, mesh, [Shard(2)], src_data_rank=None)
    token = {"num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True}
    tensor = {"num_bits": 8, "strategy": "tensor", "observer": "static_minmax", "dynamic": False}
    alike = {}
    for key, fields in {"token": token, "tensor": tensor}.items():
        args = QuantizationArgs(**fields)
        outputs = []
        for value in (split, x):
            observer = None if args.dynamic else RangeObserver(kind="minmax")
            outputs.append(ActivationFakeQuantizer(args, observer, key)(value))
        alike[f"activation {key}"] = torch.equal(outputs[0].full_tensor(), outputs[1])
    return alike


def refusals(mesh) -> dict[str, str]:
    """Schemes the shard layout cannot honour, each refused before training."""
    from compressor import CompressionSession
    from compressor.modifiers import QuantizationModifier, SparsePruningModifier

    straddling = {
        "g": {
            "targets": ["re:.*mlp\\.down_proj$"],
            "weights": {"num_bits": 4, "strategy": "group", "group_size": 64},
        }
    }
    ternary = {"g": {"targets": ["re:.*o_proj$"], "weights": {"num_bits": 2, "strategy": "tensor"}}}
    attempts = {
        "straddle": [QuantizationModifier(config_groups=straddling, start=0)],
        "ternary": [
            QuantizationModifier(config_groups=ternary, start=0, low_bit_weights="ternary")
        ],
        "topk": [SparsePruningModifier(density=0.5, method="topk", start=0, targets=PROJECTIONS)],
    }
    errors = {}
    for key, recipe in attempts.items():
        net = model().train()
        parallelize(net, mesh)
        try:
            CompressionSession().initialize(model=net, recipe=recipe, optimizer=None)
        except Exception as err:
            errors[key] = f"{type(err).__name__}: {err}"
    return errors


@torch.no_grad()
def finish(net, result: dict, out: Path, key: str, recipe: list, rank: int) -> None:
    """Keep the gathered model's state and logits, then save its checkpoint once."""
    from compressor.entrypoints.process_group import save_checkpoint_once

    result["state"] = state_of(net)
    result["logits"] = net(input_ids=data()[0]).logits
    save_checkpoint_once(net, out / key, recipe)
    torch.save(result, out / f"{key}{rank}.pt")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import os
    from unittest import mock

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        began = time.perf_counter()
        net, result = train(qat_and_sparse(), mesh)
        result["seconds"] = time.perf_counter() - began
        finish(net, result, Path(out), "qat", qat_and_sparse(), rank)
        net, result = train(rows_and_heads(), mesh)
        result["shape"] = shape_of(net)
        finish(net, result, Path(out), "rows", rows_and_heads(), rank)
        alike = {"reduced": fake_quantized_alike(mesh)}
        # every scale taken from the rank's slice alone
        quantizers = "compressor.modifiers.quantization.fake_quant"
        with (
            mock.patch(f"{quantizers}.shard_reduction", lambda *args, **kwargs: None),
            mock.patch(f"{quantizers}.activation_reduction", lambda *args, **kwargs: None),
        ):
            alike["unreduced"] = fake_quantized_alike(mesh)
        torch.save(alike, f"{out}/alike{rank}.pt")
        torch.save(refusals(mesh), f"{out}/errors{rank}.pt")
        torch.save(distilled(mesh), f"{out}/distilled{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tensor-parallel")
    context = mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2,
                                 join=False, start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the two-process run did not finish within 300 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return out


@pytest.fixture(scope="module")
def alone() -> dict[str, tuple[torch.nn.Module, dict]]:
    """Both recipes trained in this one process, the model never parallelised."""
    qat = train(qat_and_sparse())
    rows = train(rows_and_heads())
    rows[1]["shape"] = shape_of(rows[0])
    return {"qat": qat, "rows": rows}


def _load(two_ranks: Path, key: str) -> list[dict]:
    return [torch.load(two_ranks / f"{key}{rank}.pt") for rank in range(2)]


# The ranks add RowwiseParallel's partial products (and ColwiseParallel's input gradients) in
# another order than one process, so the runs part in the last bits: measured, losses within
# 5e-7 and weights within 6e-8 after six steps. (With 4-bit weights a last-bit difference made
# one weight round the other way at the third step, and the runs then drifted apart to 1.4e-4
# in the loss; see docs/distributed.md.)
TRAINED = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.integration
def test_split_weights_fake_quantize_as_whole_ones(two_ranks):
    """Each rank's slice fake-quantized with the reduced ranges gives, gathered, the whole
    weight's fake quantization bit for bit; without the reduction exactly the scales that span
    the split dimension go wrong: per channel under RowwiseParallel, per tensor under both,
    and the activations split along their features."""
    for alike in _load(two_ranks, "alike"):
        assert len(alike["reduced"]) == 14 * len(SCHEMES) + 2
        assert all(alike["reduced"].values()), [k for k, ok in alike["reduced"].items() if not ok]
        wrong = {key for key, ok in alike["unreduced"].items() if not ok}
        spanning = {
            key
            for key in alike["unreduced"]
            if "tensor" in key
            or "activation" in key
            or ("channel" in key and ("o_proj" in key or "down_proj" in key))
        }
        assert wrong == spanning


@pytest.mark.integration
@pytest.mark.parametrize("key", ["qat", "rows"])
def test_two_ranks_train_as_one_process_does(two_ranks, alone, key):
    net, expected = alone[key]
    expected_state = state_of(net)
    ranks = _load(two_ranks, key)
    for name, value in ranks[0]["state"].items():  # every rank gathered the same model
        assert torch.equal(ranks[1]["state"][name], value), name
    for result in ranks:
        assert result["masks"].keys() == expected["masks"].keys() and expected["masks"]
        for name, mask in expected["masks"].items():
            assert torch.equal(result["masks"][name], mask), name  # identical masks
        torch.testing.assert_close(result["losses"], expected["losses"], **TRAINED)
        assert result["state"].keys() == expected_state.keys()
        for name, value in expected_state.items():
            torch.testing.assert_close(result["state"][name], value, **TRAINED, msg=name)
    if key == "rows":  # the pruned units removed at finalize, after the gathering
        assert ranks[0]["shape"] == ranks[1]["shape"] == expected["shape"] == (32, 2, 1)


@pytest.mark.integration
def test_a_whole_teacher_distills_a_split_student_as_in_one_process(two_ranks):
    expected = distilled()
    for losses in _load(two_ranks, "distilled"):
        torch.testing.assert_close(losses, expected, **TRAINED)


@pytest.mark.integration
def test_masks_hold_half_the_projections(two_ranks):
    for result in _load(two_ranks, "qat"):
        assert len(result["masks"]) == 14
        for name, mask in result["masks"].items():
            assert mask.float().mean().item() == pytest.approx(0.5), name
        for name, value in result["state"].items():
            if name.endswith("_proj.weight"):
                assert (value == 0).float().mean().item() == pytest.approx(0.5), name


@pytest.mark.integration
@pytest.mark.parametrize("key", ["qat", "rows"])
def test_rank_zeros_checkpoint_reloads_in_one_process(two_ranks, alone, key):
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(two_ranks / key).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=data()[0]).logits
        single = alone[key][0](input_ids=data()[0]).logits
    for result in _load(two_ranks, key):  # the model the ranks gathered, as it computed
        torch.testing.assert_close(logits, result["logits"], rtol=1e-5, atol=1e-5)
    # a weight within the last bits of a rounding tie of the final 8-bit grid may round the
    # other way than in one process: measured logits within 1.6e-5 of one process's
    torch.testing.assert_close(logits, single, rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in two_ranks.iterdir() if p.name.startswith(key)) == [
        key, f"{key}0.pt", f"{key}1.pt"
    ]  # fmt: skip


@pytest.mark.integration
def test_schemes_the_shards_cannot_honour_are_refused(two_ranks):
    for errors in _load(two_ranks, "errors"):
        assert set(errors) == {"straddle", "ternary", "topk"}
        assert "model.layers.0.mlp.down_proj: group_size=64 straddles" in errors["straddle"]
        assert "slices of 32" in errors["straddle"]
        assert "model.layers.0.self_attn.o_proj: ternary" in errors["ternary"]
        assert "not reduced" in errors["ternary"]
        assert "method 'topk' is not supported on tensor-parallel" in errors["topk"]

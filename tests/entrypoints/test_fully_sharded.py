"""Compression-aware training under FSDP2: a tiny Llama with each decoder layer and the whole
model ``fully_shard``ed over two gloo processes, each rank training on half of every batch,
trains with quantization-aware training and pruning masks as it does in one process on the
whole batch; the session's finalize releases it from FSDP2 and gathers it, and rank 0's
checkpoint reloads in one process with the same logits. The recipes, the model, the data and
the one-process run are the tensor-parallel tests' (``test_tensor_parallel``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_tensor_parallel import (
    PROJECTIONS,
    _free_port,
    data,
    model,
    parallelize,
    qat_and_sparse,
    rows_and_heads,
    shape_of,
    state_of,
    train,
)


def shard(net: torch.nn.Module, mesh) -> None:
    """FSDP2 as it is usually applied: each decoder layer, then the whole model."""
    from torch.distributed.fsdp import fully_shard

    for layer in net.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)


def train_sharded(recipe: list, mesh) -> tuple[torch.nn.Module, dict]:
    """``test_tensor_parallel.train`` under FSDP2: the same model, rows and SGD steps, each
    rank on its half of every batch (FSDP2 averages the gradients, so a step is the
    one-process step on the whole batch); the losses averaged over the ranks."""
    import torch.distributed as dist

    from compressor import CompressionSession

    world, rank = dist.get_world_size(), dist.get_rank()
    net = model().train()
    shard(net, mesh)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2)
    session = CompressionSession()
    session.initialize(model=net, recipe=recipe, optimizer=optimizer)
    losses = []
    for batch in data():
        ids = batch.chunk(world)[rank]
        session.batch_start()
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.batch_end()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    masks = {
        f"{i}.{index}": mask.clone()
        for i, modifier in enumerate(recipe)
        for index, mask in getattr(modifier, "_masks", {}).items()
    }
    session.finalize()
    return net.eval(), {"losses": torch.tensor(losses), "masks": masks}


def released(net: torch.nn.Module) -> list[str]:
    """What is left of FSDP2 on the finalized model: DTensors, FSDP classes, torch hooks."""
    from torch.distributed.tensor import DTensor

    left = [n for n, p in net.named_parameters() if isinstance(p, DTensor)]
    for name, module in net.named_modules():
        if type(module).__name__.startswith("FSDP"):
            left.append(f"{name} is {type(module).__name__}")
        for table in ("_forward_pre_hooks", "_forward_hooks", "_state_dict_pre_hooks"):
            for hook in getattr(module, table).values():
                origin = getattr(getattr(hook, "hook", hook), "__module__", "")
                if str(origin).startswith("torch.distributed"):
                    left.append(f"{name} {table} {origin}")
    return left


def refusals(mesh, out: Path) -> dict[str, str]:
    """What FSDP2 cannot run, each refused with its reason; and the Hugging Face Trainer with
    our callback, given a model sharded by FSDP2 or tensor parallelism."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from compressor import CompressionSession
    from compressor.modifiers import SparsePruningModifier
    from compressor.utils.parametrize import register_parametrization

    errors = {}

    def attempt(key: str, run) -> None:
        try:
            run()
        except Exception as err:
            errors[key] = f"{type(err).__name__}: {err}"

    def topk() -> None:
        net = model().train()
        shard(net, mesh)
        recipe = [SparsePruningModifier(density=0.5, method="topk", start=0, targets=PROJECTIONS)]
        CompressionSession().initialize(model=net, recipe=recipe, optimizer=None)

    def sharded_later() -> None:
        net = model().train()
        session = CompressionSession()
        session.initialize(model=net, recipe=qat_and_sparse(), optimizer=None)
        shard(net, mesh)
        session.finalize()

    def hybrid() -> None:
        net = model().train()
        two_dims = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(net.model.layers[0], mesh=two_dims)
        CompressionSession().initialize(model=net, recipe=qat_and_sparse(), optimizer=None)

    def parametrized() -> None:
        net = model().train()
        shard(net, mesh)
        where = "model.layers.0.mlp.up_proj"
        register_parametrization(
            net.get_submodule(where), "weight", torch.nn.Identity(), where=where
        )

    def trainer(cls, sharding) -> None:
        from compressor import CompressionCallback
        from training_runs import make_trainer

        net = model().train()
        sharding(net, mesh)
        make_trainer(net, CompressionCallback(qat_and_sparse()), out / "trainer", cls=cls)

    from transformers import Trainer

    from compressor import CompressionTrainer

    attempt("trainer_fsdp", lambda: trainer(Trainer, shard))
    attempt("trainer_tp", lambda: trainer(CompressionTrainer, parallelize))
    attempt("topk", topk)
    attempt("parametrized", parametrized)
    attempt("later", sharded_later)
    attempt("hybrid", hybrid)
    return errors


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from compressor.entrypoints.process_group import save_checkpoint_once

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for key, recipe in (("qat", qat_and_sparse), ("rows", rows_and_heads)):
            began = time.perf_counter()
            net, result = train_sharded(recipe(), mesh)
            result["seconds"] = time.perf_counter() - began
            result["shape"] = shape_of(net)
            result["left"] = released(net)
            result["class"] = type(net).__name__
            result["state"] = state_of(net)
            with torch.no_grad():
                result["logits"] = net(input_ids=data()[0]).logits
            save_checkpoint_once(net, Path(out) / key, recipe())
            torch.save(result, Path(out) / f"{key}{rank}.pt")
        torch.save(refusals(mesh, Path(out)), Path(out) / f"errors{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fully-sharded")
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
    """Both recipes trained in this one process on the whole batches, never sharded."""
    qat = train(qat_and_sparse())
    rows = train(rows_and_heads())
    rows[1]["shape"] = shape_of(rows[0])
    return {"qat": qat, "rows": rows}


def _load(two_ranks: Path, key: str) -> list[dict]:
    return [torch.load(two_ranks / f"{key}{rank}.pt") for rank in range(2)]


# Each rank's half batch and FSDP2's averaging of the two halves' gradients add in another
# order than one process's whole batch, so the runs part in the last bits: measured, losses
# within 4.8e-7 and weights within 6e-8 after six steps with 8-bit QAT and 50% masks (9.3e-9
# with row and head masks).
TRAINED = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.integration
@pytest.mark.parametrize("key", ["qat", "rows"])
def test_two_fully_sharded_ranks_train_as_one_process_does(two_ranks, alone, key):
    """Fake quantization on the whole weight FSDP2 gathers, masks chosen from the whole
    weight's scores (gathered from the shards) and held on each rank's shard: the losses, the
    masks and the final weights are one process's."""
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
def test_finalize_leaves_an_ordinary_model(two_ranks):
    for key in ("qat", "rows"):
        for result in _load(two_ranks, key):
            assert result["class"] == "LlamaForCausalLM"
            assert result["left"] == []


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
    torch.testing.assert_close(logits, single, rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in two_ranks.iterdir() if p.name.startswith(key)) == [
        key, f"{key}0.pt", f"{key}1.pt"
    ]  # fmt: skip


@pytest.mark.integration
def test_what_fsdp2_cannot_run_is_refused(two_ranks):
    for errors in _load(two_ranks, "errors"):
        keys = {"trainer_fsdp", "trainer_tp", "topk", "parametrized", "later", "hybrid"}
        assert set(errors) == keys, errors
        # the Trainer with our callback, refused when it is built: on CPU it would wrap the
        # sharded model in DistributedDataParallel, which fails on DTensors
        for key in ("trainer_fsdp", "trainer_tp"):
            assert errors[key].startswith("ValueError: model: its parameters are DTensors")
            assert "with CompressionSession in your own loop" in errors[key]
        assert "method 'topk' is not supported on tensor-parallel or FSDP2" in errors["topk"]
        assert errors["parametrized"].startswith(
            "ValueError: model.layers.0.mlp.up_proj.weight is sharded with FSDP2 (fully_shard), which a "
            "parametrization (Identity) cannot apply to"
        )
        assert errors["later"].startswith("ValueError: the model was sharded with FSDP2")
        assert "after the compression session was initialized" in errors["later"]
        assert errors["hybrid"].startswith("ValueError: model.layers.0 is sharded with FSDP2")
        assert "2-dimensional device mesh (1, 2)" in errors["hybrid"]

"""``oneshot`` under a process group of two gloo processes: each rank calibrates on its half of
the batches, and every rank ends with what one process computes from all of them, its decoder
layers in memory or on disk; recipes that cannot be reduced, and ranks that disagree, are
refused before any work."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from compressed_tensors.offload.cache import DiskCache, OffloadCache
from pydantic import PrivateAttr

from compressor.core.events import Event, EventType
from compressor.core.state import State
from compressor.modifiers.base import CalibrationTraits, Modifier
from conftest import tiny_llama_config

ROWS, SEQ, BATCH = 8, 16, 2

# GPTQ with row-wise scales: each rank solves half of every problem's rows
GPTQ_GROUP = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 16}
"""
# per-tensor scales need whole weights (problems shared out by cost), and static input
# ranges (minmax) are reduced too; the basic pipeline quantizes every Linear at the end
GPTQ_TENSOR_STATIC = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: [lm_head]
      true_sequential: false
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 8, type: int, symmetric: true, strategy: tensor}
          input_activations: {num_bits: 8, type: int, symmetric: true, strategy: tensor,
                              dynamic: false, observer: static_minmax}
"""
SPARSEGPT_THEN_WANDA = """
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      targets: ["re:model.layers.0$"]
    WandaPruningModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      targets: ["re:model.layers.1$"]
"""
SMOOTHQUANT_AWQ = """
quant_stage:
  quant_modifiers:
    SmoothQuantModifier:
      smoothing_strength: 0.8
      mappings:
        - [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"]
    AWQModifier:
      n_grid: 6
      mappings:
        - smooth_layer: re:.*post_attention_layernorm$
          balance_layers: [re:.*gate_proj$, re:.*up_proj$]
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 16}
"""
LAYER_REDUCTION = """
reduce_stage:
  reduce_modifiers:
    LayerReductionModifier:
      strategy: angular
      num_layers_to_drop: 1
"""
RECIPES = {
    "gptq_group": (GPTQ_GROUP, "auto"),
    "gptq_tensor": (GPTQ_TENSOR_STATIC, "basic"),
    "sparse": (SPARSEGPT_THEN_WANDA, "auto"),
    "smooth": (SMOOTHQUANT_AWQ, "auto"),
    "reduce": (LAYER_REDUCTION, "auto"),
}
SAVED = "gptq_tensor"  # the run whose checkpoint rank 0 writes
ON_DISK = ("gptq_group", "sparse")  # also run with the decoder layers offloaded to disk


def model(layers: int = 2) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=layers)).eval()


def rows():
    """8 rows of 16 tokens; the second half from other tokens than the first, so the two
    ranks' statistics differ."""
    from datasets import Dataset

    ids = torch.randint(0, 64, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))
    ids[ROWS // 2 :] += 64
    return Dataset.from_dict({"input_ids": ids.tolist()})


def run(key: str, output_dir: Path | None = None, layers: int = 2) -> dict[str, torch.Tensor]:
    """``oneshot`` with one of RECIPES on the tiny Llama and ``rows()``; its state dict."""
    from compressor import oneshot

    recipe, pipeline = RECIPES[key]
    net = oneshot(
        model(layers),
        recipe,
        rows(),
        num_calibration_samples=ROWS,
        max_seq_length=SEQ,
        batch_size=BATCH,
        pipeline=pipeline,
        output_dir=output_dir,
    )
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@Modifier.register()
class OnloadedOnRank(Modifier):
    """At the end of each layer's (or stage's) turn: which layer, how many offloaded tensors
    this rank holds in memory, and how many the layer has. It leaves the pipeline's choices
    (stages, stacked batches) to the recipe's modifiers and gathers nothing from the data."""

    _held: list = PrivateAttr(default_factory=list)

    def requires_calibration_data(self) -> bool:
        return True

    def calibration_traits(self) -> CalibrationTraits:
        return CalibrationTraits(
            supports_offloaded_models=True,
            reads_outputs=False,
            merges_batches=True,
            accepts_stages=True,
            reduces_across_ranks=True,
        )

    def on_update(self, state: State, event: Event) -> None:
        if event.type_ != EventType.SEQUENTIAL_EPOCH_END:
            return
        layers = state.model.model.layers
        inside = [
            i
            for i, layer in enumerate(layers)
            if any(p is m for m in layer.modules() for p in event.modules)
        ]
        if inside:
            own = sum(len(m._parameters) + len(m._buffers) for m in layers[inside[0]].modules())
            self._held.append((inside[0], len(OffloadCache.keep_onloaded_values), own))


def on_disk(key: str, out: Path) -> dict:
    """``run(key)`` on the tiny Llama's checkpoint in ``out / "fp"``, loaded with its decoder
    layers offloaded to disk in ``out / f"offload_{key}"``: the state dict, where each layer's
    weights live, the folders (relative to ``out``) of the files behind this rank's offloaded
    tensors, and what ``OnloadedOnRank`` saw."""
    from compressor import Recipe, oneshot

    recipe, pipeline = RECIPES[key]
    probe = OnloadedOnRank()
    net = oneshot(
        out / "fp",
        [*Recipe.from_yaml(recipe).modifiers, probe],
        rows(),
        num_calibration_samples=ROWS,
        max_seq_length=SEQ,
        batch_size=BATCH,
        pipeline=pipeline,
        offload_folder=out / f"offload_{key}",
    )
    layers = net.model.layers
    files = {
        DiskCache.index[tensor]["safetensors_file"]
        for module in layers.modules()
        if isinstance(module._parameters, DiskCache)
        for tensor in module._parameters.offloaded_values.values()
        if tensor is not None
    }
    return {
        "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "devices": [str(layer.self_attn.q_proj._parameters.offload_device) for layer in layers],
        "folders": sorted({str(Path(f).parent.relative_to(out)) for f in files}),
        "held": probe._held,
    }


def loaded_on_disk(out: Path, folder: Path, shared_by_compressed_tensors: bool = False):
    """The tiny Llama's checkpoint as a user loads it under ``torchrun``: its decoder layers
    offloaded by accelerate to ``folder``, and (if asked) dispatched by compressed-tensors
    across the ranks, which shares rank 0's offload with every rank."""
    from compressed_tensors.offload import from_accelerate
    from transformers import AutoModelForCausalLM

    from compressor.entrypoints.loading import layers_on_disk_map

    net = AutoModelForCausalLM.from_pretrained(
        out / "fp", device_map=layers_on_disk_map(out / "fp"), offload_folder=str(folder)
    )
    if shared_by_compressed_tensors:
        from_accelerate(net)
    return net


def hessians_of_share(rank: int = 0, world: int = 1) -> dict[str, tuple[torch.Tensor, int]]:
    """``SharedHessians`` of three Linears over this rank's share of 6 random inputs (q and k
    read the same tensors, as a layer's projections do), reduced over the ranks."""
    from compressor.modifiers.quantization.gptq.hessian import SharedHessians
    from compressor.modifiers.quantization.gptq.ranks import reduce_hessians

    generator = torch.Generator().manual_seed(2)
    inputs = [torch.randn(3 + i, 8, generator=generator) for i in range(6)]
    share = len(inputs) // world
    hessians = SharedHessians()
    for x in inputs[rank * share : (rank + 1) * share]:
        hessians.observe("q", x)
        hessians.observe("k", x)
        hessians.observe("o", 2 * x)
    linears = {name: torch.nn.Linear(8, 4) for name in ("q", "k", "o")}
    names = reduce_hessians(hessians, ["q", "k", "o"], linears)
    return {name: (hessians[name][0].clone(), hessians[name][1]) for name in names}


def moving_average_ranges():
    """Static input ranges as a moving average: they depend on batch order, so no reduction
    over ranks gives one process's result."""
    from compressor.modifiers import QuantizationModifier

    args = {"num_bits": 8, "strategy": "tensor", "dynamic": False, "observer": "moving_average"}
    groups = {"g": {"targets": ["Linear"], "input_activations": args}}
    return QuantizationModifier(config_groups=groups, ignore=["lm_head"])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from compressor import oneshot
    from compressor.modifiers import SparseGPTModifier

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(hessians_of_share(rank, world), f"{out}/hessians{rank}.pt")
        for key in RECIPES:
            saved = Path(out) / "ckpt" if key == SAVED else None
            torch.save(run(key, saved), f"{out}/{key}{rank}.pt")
        if rank == 0:
            model().save_pretrained(Path(out) / "fp")
        dist.barrier()
        for key in ON_DISK:
            torch.save(on_disk(key, Path(out)), f"{out}/disk_{key}{rank}.pt")
        gptq = RECIPES["gptq_group"][0]
        errors = {}
        attempts = {
            # refused before the model (which does not exist) is loaded
            "moving": lambda: oneshot(Path(out) / "no-model", [moving_average_ranges()], rows()),
            "recipe": lambda: oneshot(model(), [SparseGPTModifier(sparsity=0.5 - rank / 4)], rows()),
            "model": lambda: oneshot(model(2 + rank), [SparseGPTModifier(sparsity=0.5)], rows()),
            "batches": lambda: oneshot(
                model(), [SparseGPTModifier(sparsity=0.5)], rows(), num_calibration_samples=1
            ),
            # refused before calibration
            "one_folder": lambda: oneshot(
                loaded_on_disk(Path(out), Path(out) / "one_folder"), gptq, rows()
            ),
            "shared": lambda: oneshot(
                loaded_on_disk(Path(out), Path(out) / f"shared{rank}", True), gptq, rows()
            ),
        }  # fmt: skip
        for key, attempt in attempts.items():
            try:
                attempt()
            except Exception as err:
                errors[key] = f"{type(err).__name__}: {err}"
        torch.save(errors, f"{out}/errors{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
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


@pytest.mark.integration
def test_each_rank_holds_the_hessian_of_all_the_data(two_ranks):
    whole = hessians_of_share()
    halves = [torch.load(two_ranks / f"hessians{r}.pt") for r in range(2)]
    assert set(whole) == {"q", "k", "o"}
    for name, (hessian, count) in whole.items():
        assert count == sum(3 + i for i in range(6))
        for half in halves:
            assert half[name][1] == count
            # float32 sums in another order: measured differences below 1e-6
            torch.testing.assert_close(half[name][0], hessian, rtol=1e-5, atol=1e-6)
    # without the reduction each rank would hold its own half's Hessian
    for rank in range(2):
        alone = torch.stack([hessians_of_share(rank, 2)[n][0] for n in whole])
        assert not torch.allclose(alone, torch.stack([whole[n][0] for n in whole]), rtol=1e-2)


@pytest.fixture(scope="module")
def saved_alone(two_ranks) -> dict[str, torch.Tensor]:
    """The SAVED run in one process, its checkpoint written beside the ranks' one."""
    return run(SAVED, two_ranks / "single")


def _assert_close(result: dict, expected: dict, key: str) -> None:
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        # measured: GPTQ, AWQ/SmoothQuant, Wanda and the angular distances give the
        # one-process result bit for bit on these rows; SparseGPT's compensated weights differ
        # by up to 5e-7 (float32 Hessian sums added in another order)
        torch.testing.assert_close(result[name], value, rtol=1e-5, atol=1e-6, msg=f"{key}: {name}")


@pytest.mark.integration
@pytest.mark.parametrize("key", list(RECIPES))
def test_two_ranks_compress_as_one_process_does(two_ranks, saved_alone, key):
    ranks = [torch.load(two_ranks / f"{key}{r}.pt") for r in range(2)]
    # rank 1 did not save: its model is the one a run without output_dir returns
    single = run(key)
    _assert_close(ranks[1], single, key)
    if key == SAVED:  # rank 0 saved (compressed, then decompressed, its model), as one would
        single = saved_alone
    _assert_close(ranks[0], single, key)
    for name in set(ranks[0]) & set(ranks[1]):  # the broadcast results: bit for bit alike
        assert torch.equal(ranks[0][name], ranks[1][name]), name


@pytest.mark.integration
def test_rank_zero_writes_the_checkpoint_one_process_writes(two_ranks, saved_alone):
    from safetensors.torch import load_file

    written = load_file(two_ranks / "ckpt" / "model.safetensors")
    expected = load_file(two_ranks / "single" / "model.safetensors")
    _assert_close(written, expected, SAVED)
    assert sorted(p.name for p in (two_ranks / "ckpt").iterdir()) == sorted(
        p.name for p in (two_ranks / "single").iterdir()
    )
    assert [p.name for p in two_ranks.iterdir() if p.name.startswith(".")] == []


@pytest.mark.integration
def test_what_cannot_run_on_several_ranks_is_refused_before_any_work(two_ranks):
    for rank in range(2):
        errors = torch.load(two_ranks / f"errors{rank}.pt")
        assert errors["moving"].startswith("RecipeError: QuantizationModifier: oneshot runs")
        assert "disagree on the recipe" in errors["recipe"]
        assert "disagree on the model" in errors["model"]
        assert "1 calibration batch(es) for 2 ranks" in errors["batches"]
        # each rank rewrites its own offloaded layers: one folder for both is refused
        assert errors["one_folder"].startswith("ValueError: offload_folder="), errors
        assert "ranks [0, 1] offloaded their models to the same folder" in errors["one_folder"]
        # as is compressed-tensors' offload shared across the ranks (rank 0's files)
        assert errors["shared"].startswith("ValueError: model: on rank 0, "), errors
        assert "offloaded by compressed-tensors across the ranks" in errors["shared"]


@pytest.mark.integration
@pytest.mark.parametrize("key", ON_DISK)
def test_layers_on_disk_compress_on_several_ranks_as_in_one_process(two_ranks, key):
    """Each rank loads the checkpoint with its decoder layers on disk in its own folder and
    compresses one layer at a time; the result is one process's in memory."""
    results = [torch.load(two_ranks / f"disk_{key}{r}.pt") for r in range(2)]
    single = run(key)
    for rank, result in enumerate(results):
        assert result["devices"] == ["disk", "disk"]  # still on disk after compressing
        # every tensor behind this rank's layers is a file of its own folder: none is another
        # rank's (compressed-tensors' dispatch under a process group points every rank at
        # rank 0's files, which the ranks would then rewrite at once)
        assert result["folders"] == [f"offload_{key}/rank{rank}"]
        _assert_close(result["state"], single, f"{key} on disk, rank {rank}")
        # a layer's worth in memory: at the end of each layer's turn only its own tensors
        assert sorted({layer for layer, _, _ in result["held"]}) == [0, 1]
        assert all(0 < held <= own for _, held, own in result["held"]), result["held"]
    for name, value in results[0]["state"].items():  # the broadcast results: alike
        assert torch.equal(value, results[1]["state"][name]), name


def test_awq_clipping_is_refused_under_a_process_group(monkeypatch):
    """AWQ's clipping search reads this rank's input Grams only: refused by name, while AWQ's
    scale search (reduced over the ranks) is accepted."""
    from compressor.calibration.arguments import CalibrationArguments
    from compressor.checkpoint.directory import OutputArguments
    from compressor.entrypoints import process_group
    from compressor.modifiers.transform.awq import AWQModifier
    from compressor.recipe import Recipe, RecipeError
    from compressor.utils import distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    clip = Recipe.from_modifiers([AWQModifier(scheme="W4A16", apply_clip=True)])
    with pytest.raises(RecipeError, match="AWQModifier: oneshot runs under a process group"):
        process_group.check_recipe_for_ranks(
            clip, CalibrationArguments(), OutputArguments(), "model"
        )
    assert AWQModifier(scheme="W4A16").calibration_traits().reduces_across_ranks

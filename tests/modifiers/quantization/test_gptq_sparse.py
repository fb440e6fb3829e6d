"""GPTQ on weights that already have zeros (pruned): every zero stays exactly zero, only kept
weights are quantized and compensated, and the solve is SparseGPT's with the mask fixed."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from compressor.modifiers.quantization.gptq import (
    accumulate_hessian,
    gptq_quantize_weight,
    gptq_quantize_weights,
    round_to_nearest,
)

ARGS = {
    "channel-sym": QuantizationArgs(num_bits=4, strategy="channel"),
    "group-sym": QuantizationArgs(num_bits=4, strategy="group", group_size=16),
    "group-asym": QuantizationArgs(num_bits=4, strategy="group", group_size=16, symmetric=False),
    "tensor-sym": QuantizationArgs(num_bits=4, strategy="tensor"),
}


def correlated_layer(n_in=96, n_out=48, tokens=1024, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=gen) / n_in**0.5
    scales = torch.rand(n_in, generator=gen) * 3 + 0.1
    x = (torch.randn(tokens, n_in, generator=gen) @ mix) * scales
    w = torch.randn(n_out, n_in, generator=gen) * 0.05
    return w, x


def two_of_four(w):
    """``w`` with the two smallest magnitudes of every four consecutive inputs zeroed."""
    groups = w.abs().reshape(-1, 4)
    pruned = torch.zeros_like(groups, dtype=torch.bool)
    pruned.scatter_(1, groups.argsort(dim=1)[:, :2], True)
    return w.masked_fill(pruned.view_as(w), 0.0)


def output_error(w, q, x):
    return float(((w - q) @ x.T).norm())


@pytest.mark.parametrize("name", list(ARGS))
@pytest.mark.parametrize("actorder", [None, "static"])
def test_pruned_positions_stay_zero_on_the_grid_and_beat_round_to_nearest(name, actorder):
    args = ARGS[name]
    w, x = correlated_layer()
    sparse = two_of_four(w)
    h, _ = accumulate_hessian(x)
    result = gptq_quantize_weight(sparse, h, args, block_size=32, actorder=actorder)
    pruned = sparse == 0
    assert (result.weight[pruned] == 0).all()
    assert ((result.weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all()
    assert (result.weight[~pruned] != 0).float().mean() > 0.8  # kept weights are still there
    torch.testing.assert_close(
        fake_quantize(result.weight, result.scale, result.zero_point, args), result.weight
    )
    rtn, _, _ = round_to_nearest(sparse, args)
    assert (rtn[pruned] == 0).all()
    assert output_error(sparse, result.weight, x) < 0.9 * output_error(sparse, rtn, x)


def test_the_masked_solve_is_sparsegpts_column_loop_with_the_mask_fixed():
    """A direct column-by-column implementation in float64 (SparseGPT's joint prune and
    quantize step, the mask given): each column rounded on the kept positions, set to zero on
    the pruned ones, and its error fed to every later column through the inverse Hessian's
    Cholesky factor."""
    args = ARGS["channel-sym"]
    w, x = correlated_layer()
    sparse = two_of_four(w)
    h, _ = accumulate_hessian(x, dtype=torch.float64)
    keep = (sparse != 0).double()

    damped = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    work = sparse.double().clone()
    scale, zero = calculate_qparams(work.amin(dim=1), work.amax(dim=1), args)
    expected = torch.zeros_like(work)
    for i in range(work.shape[1]):
        column = work[:, i]
        q = fake_quantize(column.unsqueeze(1), scale.unsqueeze(1), zero.unsqueeze(1), args)
        q = q.squeeze(1) * keep[:, i]
        expected[:, i] = q
        err = (column - q) / hinv[i, i]
        work[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)

    result = gptq_quantize_weight(sparse, h.float(), args, block_size=32)
    # one grid step is about max / 7; float32 against float64 may flip a rare tie, nothing more
    mismatched = ((result.weight.double() - expected).abs() > 1e-4).float().mean()
    assert mismatched < 0.01
    assert (expected[keep == 0] == 0).all()


@pytest.mark.parametrize("actorder", [None, "static"])
def test_dense_and_pruned_problems_in_lockstep_equal_each_solved_alone(actorder):
    """A bundle with one pruned weight masks every problem in it; the dense ones (mask all
    ones) come out bit for bit as they do alone, on the dense path."""
    args = ARGS["group-asym"]
    problems = []
    for seed, rows in ((1, 24), (2, 8), (3, 40)):
        w, x = correlated_layer(n_in=64, n_out=rows, tokens=512, seed=seed)
        problems.append((w, accumulate_hessian(x)[0]))
    problems[1] = (two_of_four(problems[1][0]), problems[1][1])
    alone = [
        gptq_quantize_weight(w, h, args, block_size=32, actorder=actorder) for w, h in problems
    ]
    together = gptq_quantize_weights(problems, args, block_size=32, actorder=actorder)
    for one, joint in zip(alone, together, strict=True):
        assert torch.equal(one.weight, joint.weight)
        assert torch.equal(one.scale, joint.scale)
    assert (together[1].weight[problems[1][0] == 0] == 0).all()


def _linears(model):
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }


@pytest.mark.parametrize("symmetric", [True, False])
def test_two_of_four_then_gptq_keeps_every_group_two_of_four_after_reload(
    tiny_llama, tmp_path, symmetric
):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from compressor import oneshot
    from compressor.modifiers import GPTQModifier, SparsePruningModifier

    weights = {"num_bits": 4, "strategy": "group", "group_size": 16, "symmetric": symmetric}
    gen = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 128, (8, 32), generator=gen)})
    recipe = [
        SparsePruningModifier(mask_structure="2:4"),
        GPTQModifier(
            config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"]
        ),
    ]
    pruned = {n: two_of_four(m.weight.detach()) == 0 for n, m in _linears(tiny_llama).items()}
    out = tmp_path / "sparse-gptq"
    model = oneshot(tiny_llama, recipe, data, output_dir=out)
    in_memory = {n: m.weight.detach().clone() for n, m in _linears(model).items()}

    reloaded = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for name, module in _linears(reloaded).items():
        weight = module.weight.detach().to(in_memory[name].dtype)
        torch.testing.assert_close(weight, in_memory[name])
        assert (weight[pruned[name]] == 0).all(), name  # exactly zero, every one
        assert ((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all(), name  # 100% of groups
        assert (weight[~pruned[name]] != 0).float().mean() > 0.8, name

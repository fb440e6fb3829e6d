"""SparseGPT: the numeric core against a direct implementation of the paper's algorithm, the
modifier on tiny Llamas (sequential pipeline, llm-compressor's recipe layout), and bad input."""

import pytest
import torch
from datasets import Dataset
from pydantic import ValidationError

from compressor import Recipe, oneshot
from compressor.modifiers import GPTQModifier, SparseGPTModifier
from compressor.modifiers.pruning.sparsegpt import sparsegpt_prune
from compressor.modifiers.quantization.gptq import accumulate_hessian

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def correlated_layer(n_in=64, n_out=24, tokens=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=gen) / n_in**0.5
    x = (torch.randn(tokens, n_in, generator=gen) @ mix) * (torch.rand(n_in, generator=gen) + 0.2)
    return torch.randn(n_out, n_in, generator=gen), x


def paper_sparsegpt(w, h, sparsity, n_m, block, damp=0.01, keep=None):
    """Algorithm 1 of Frantar & Alistarh (2023), written out in float64 without lazy updates:
    every column's error goes to every later column at once. ``keep``: positions pruned
    whatever their saliency, chosen first (llm-compressor's preserve_sparsity_mask)."""
    first = torch.zeros_like(w, dtype=torch.bool) if keep is None else keep
    w = w.double().clone()
    h = h.double() + damp * h.double().diagonal().mean() * torch.eye(
        h.shape[0], dtype=torch.float64
    )
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, w.shape[1], block):
        stop = min(start + block, w.shape[1])
        if n_m is None:  # the block's least salient weights, over all its rows
            saliency = w[:, start:stop] ** 2 / u.diagonal()[start:stop] ** 2
            saliency[first[:, start:stop]] = -1.0
            count = int(sparsity * saliency.numel())
            order = saliency.flatten().argsort()[:count]
            block_mask = torch.zeros(saliency.numel(), dtype=torch.bool)
            block_mask[order] = True
            pruned[:, start:stop] = block_mask.view_as(saliency) | first[:, start:stop]
        for j in range(start, stop):
            if n_m is not None and (j - start) % n_m[1] == 0:
                n, m = n_m
                saliency = w[:, j : j + m] ** 2 / u.diagonal()[j : j + m] ** 2
                saliency[first[:, j : j + m]] = -1.0
                drop = saliency.argsort(dim=1)[:, : m - n]
                pruned[:, j : j + m] = (
                    torch.zeros_like(saliency, dtype=torch.bool).scatter(1, drop, True)
                    | first[:, j : j + m]
                )
            q = w[:, j].masked_fill(pruned[:, j], 0.0)
            err = (w[:, j] - q) / u[j, j]
            w[:, j:] -= err.unsqueeze(1) * u[j, j:].unsqueeze(0)
            w[:, j] = q
    return w, pruned


@pytest.mark.parametrize("structure", [None, (2, 4), (1, 4)], ids=["50%", "2:4", "1:4"])
def test_sparsegpt_equals_the_papers_algorithm_on_the_same_hessian(structure):
    w, x = correlated_layer()
    h, _ = accumulate_hessian(x, dtype=torch.float64)
    expected, expected_mask = paper_sparsegpt(w, h, 0.5, structure, block=16)
    result = sparsegpt_prune(w, h, 0.5, mask_structure=structure, block_size=16)
    assert (result.mask != expected_mask).float().mean() < 0.01  # a rare float32 tie at most
    same = result.mask == expected_mask
    torch.testing.assert_close(
        result.weight.double()[same.all(dim=1)], expected[same.all(dim=1)], rtol=1e-3, atol=1e-3
    )
    assert (result.weight[result.mask] == 0).all()
    if structure is None:
        assert result.mask.float().mean() == 0.5
    else:
        n, m = structure
        assert ((result.weight.reshape(-1, m) != 0).sum(dim=1) <= n).all()
    # the compensation is the point: far less output error than magnitude pruning
    magnitude = w * (w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values)
    if structure is None:
        assert ((w - result.weight) @ x.T).norm() < 0.9 * ((w - magnitude) @ x.T).norm()


@pytest.mark.parametrize(
    ("structure", "prior", "target"),
    [(None, 0.5, 0.7), (None, 0.3, 0.3), ((2, 4), 0.25, 0.5), ((1, 4), 0.6, 0.75)],
    ids=["50%->70%", "30%->30%", "25%->2:4", "60%->1:4"],
)
def test_preserve_sparsity_mask_extends_the_zeros_the_weight_has(structure, prior, target):
    """llm-compressor's preserve_sparsity_mask: the weight's zeros stay pruned and count
    towards the target; the rest is chosen and compensated as SparseGPT does (the paper's
    algorithm with those positions pruned first); without it, the compensation fills some
    of them again."""
    w, x = correlated_layer()
    h, _ = accumulate_hessian(x, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    zeros = torch.rand(w.shape, generator=gen) < prior
    w = w.masked_fill(zeros, 0.0)
    result = sparsegpt_prune(w, h, target, mask_structure=structure, block_size=16, keep_zeros=True)
    assert result.mask[zeros].all() and (result.weight[zeros] == 0).all()
    assert (result.weight[result.mask] == 0).all()
    if structure is None:
        assert result.mask.float().mean() == pytest.approx(target, abs=1 / 16)
    else:
        n, m = structure
        assert ((result.weight.reshape(-1, m) != 0).sum(dim=1) <= n).all()
    expected, expected_mask = paper_sparsegpt(w, h, target, structure, block=16, keep=zeros)
    assert (result.mask != expected_mask).float().mean() < 0.01  # a rare float32 tie at most
    same = (result.mask == expected_mask).all(dim=1)
    torch.testing.assert_close(result.weight.double()[same], expected[same], rtol=1e-3, atol=1e-3)
    regrown = sparsegpt_prune(w, h, target, mask_structure=structure, block_size=16)
    assert (regrown.weight[zeros] != 0).any()


def test_preserve_sparsity_mask_refuses_a_target_below_the_present_sparsity():
    w, x = correlated_layer()
    h, _ = accumulate_hessian(x)
    w = w.masked_fill(torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.8, 0.0)
    with pytest.raises(ValueError, match=r"already 0\.[78]\d* sparse.*preserve_sparsity_mask"):
        sparsegpt_prune(w, h, 0.5, keep_zeros=True)


def test_sparsegpt_bad_arguments_name_the_problem():
    w, x = correlated_layer()
    h, _ = accumulate_hessian(x)
    with pytest.raises(ValueError, match="M=5 does not divide"):
        sparsegpt_prune(w, h, 0.5, mask_structure=(2, 5))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        sparsegpt_prune(w, h, 1.0)
    with pytest.raises(ValueError, match="input columns"):
        sparsegpt_prune(w, h[:8, :8], 0.5)


def random_data(count=8, length=32):
    gen = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"input_ids": torch.randint(0, 128, (count, length), generator=gen)})


def _linears(model):
    return {n: m for n, m in model.named_modules() if n.endswith(LINEARS)}


def test_llmcompressor_recipe_with_per_layer_sparsities_runs_layer_by_layer(tiny_llama):
    recipe = Recipe.from_yaml(
        """
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: [0.3, 0.6]
      mask_structure: "0:0"
      block_size: 16
      dampening_frac: 0.01
      targets: ["re:model.layers.\\\\d+$"]
      ignore: ["re:.*lm_head"]
"""
    )
    before = {n: m.weight.detach().clone() for n, m in _linears(tiny_llama).items()}
    model = oneshot(tiny_llama, recipe, random_data(), pipeline="sequential")
    for name, module in _linears(model).items():
        expected = 0.3 if name.startswith("model.layers.0.") else 0.6
        zeros = (module.weight == 0).float().mean().item()
        assert zeros == pytest.approx(expected, abs=0.02), name
        kept = module.weight != 0
        assert not torch.equal(module.weight[kept], before[name][kept]), name  # compensated
    assert (model.lm_head.weight != 0).all()


def test_llmcompressor_additional_sparsity_recipe_extends_the_first_stage_mask(tiny_llama):
    """llm-compressor's "additional sparsity" layout: a first stage prunes layer 0 to 50%, a
    second to 70% with preserve_sparsity_mask; every zero of the first stays, the layer ends
    at 70%, the other layers are untouched. A second stage below the first's sparsity is
    refused, naming the module."""
    first = """
first_stage:
  obcq_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      block_size: 16
      mask_structure: "0:0"
      targets: ["re:.*model.layers.0$"]
"""
    second = """
second_stage:
  obcq_modifiers:
    SparseGPTModifier:
      sparsity: {sparsity}
      block_size: 16
      dampening_frac: 0.01
      mask_structure: "0:0"
      targets: ["re:.*model.layers.0$"]
      preserve_sparsity_mask: True
"""
    untouched = {n: m.weight.detach().clone() for n, m in _linears(tiny_llama).items()}
    model = oneshot(tiny_llama, Recipe.from_yaml(first), random_data(), pipeline="sequential")
    after_first = {n: m.weight.detach() == 0 for n, m in _linears(model).items()}
    model = oneshot(
        model, Recipe.from_yaml(second.format(sparsity=0.7)), random_data(), pipeline="sequential"
    )
    for name, module in _linears(model).items():
        zeros = module.weight == 0
        if name.startswith("model.layers.0."):
            assert after_first[name].float().mean().item() == pytest.approx(0.5, abs=0.02), name
            assert zeros[after_first[name]].all(), name  # the first stage's mask is kept
            assert zeros.float().mean().item() == pytest.approx(0.7, abs=0.02), name
        else:
            assert torch.equal(module.weight, untouched[name]), name
    with pytest.raises(ValueError, match=r"model\.layers\.0\..*already 0\.\d+ sparse"):
        oneshot(model, Recipe.from_yaml(second.format(sparsity=0.5)), random_data())


def test_two_of_four_sparsegpt_then_gptq_stays_two_of_four(tiny_llama):
    weights = {"num_bits": 4, "strategy": "group", "group_size": 16, "symmetric": True}
    recipe = [
        SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["re:.*lm_head"]),
        GPTQModifier(
            config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"]
        ),
    ]
    model = oneshot(tiny_llama, recipe, random_data())
    for name, module in _linears(model).items():
        groups = module.weight.detach().reshape(-1, 4)
        assert ((groups != 0).sum(dim=1) <= 2).all(), name  # every group of four is 2:4
        # and the kept weights are still there (4 bits round a few small ones to zero)
        assert ((groups != 0).sum(dim=1) == 2).float().mean() > 0.9, name


def test_sparsegpt_beats_magnitude_on_the_real_model(stories_model_path, tinystories_text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_model_path)
    ids = tokenizer(tinystories_text[:20000], return_tensors="pt").input_ids[0]
    calib = Dataset.from_dict({"input_ids": ids[: 8 * 128].reshape(8, 128)})
    evaluation = ids[8 * 128 : 12 * 128].reshape(4, 128)

    def loss(model):
        with torch.no_grad():
            return model(input_ids=evaluation, labels=evaluation).loss.item()

    from compressor.modifiers import SparsePruningModifier

    results = {}
    for label, modifier in (
        ("sparsegpt", SparseGPTModifier(sparsity=0.5, ignore=["re:.*lm_head"])),
        ("magnitude", SparsePruningModifier(sparsity=0.5, targets=["re:.*layers.*proj$"])),
    ):
        model = AutoModelForCausalLM.from_pretrained(stories_model_path).eval()
        model = oneshot(model, [modifier], calib if label == "sparsegpt" else None)
        results[label] = loss(model)
    assert results["sparsegpt"] < results["magnitude"]


def test_bad_recipes_are_refused_at_parse_or_initialize_naming_the_module(tiny_llama):
    with pytest.raises(ValidationError, match=r"sparsity must be in \[0, 1\)"):
        SparseGPTModifier(sparsity=1.0)
    with pytest.raises(ValidationError, match=r"sparsity must be in \[0, 1\)"):
        SparseGPTModifier(sparsity=[0.5, -0.1])
    with pytest.raises(ValidationError, match="mask_structure"):
        SparseGPTModifier(mask_structure="4:2")
    with pytest.raises(ValidationError, match="contradicts"):
        SparseGPTModifier(sparsity=0.7, mask_structure="2:4")
    with pytest.raises(ValidationError, match="multiple of M=4"):
        SparseGPTModifier(mask_structure="2:4", block_size=6)
    with pytest.raises(ValidationError, match="sparsity is required"):
        SparseGPTModifier()
    with pytest.raises(ValidationError, match="start"):
        SparseGPTModifier(sparsity=0.5, start=0)
    with pytest.raises(ValidationError, match="sparsity_profile: owl needs one sparsity"):
        SparseGPTModifier(sparsity=[0.5, 0.5], sparsity_profile="owl", owl_m=5, owl_lmbda=0.08)
    cases = [
        (dict(mask_structure="2:12", block_size=24), "M=12 does not divide the input width 32 of"),
        (
            dict(sparsity=[0.5, 0.5, 0.5], targets=["re:model.layers.\\d+$"]),
            "3 values but targets",
        ),
        (dict(sparsity=0.5, targets=["re:.*input_layernorm"]), "LlamaRMSNorm; only Linear"),
        (dict(sparsity=0.5, targets=["re:nothing"]), "match no module"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            oneshot(tiny_llama, [SparseGPTModifier(**fields)], random_data())


def test_layers_on_disk_give_the_in_memory_result(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "fp")
    disk = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }

    def recipe():
        return [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["re:.*lm_head"])]

    in_memory = oneshot(
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp"), recipe(), random_data()
    )
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", device_map=disk, offload_folder=tmp_path / "offload"
    )
    offloaded = oneshot(offloaded, recipe(), random_data())
    expected = _linears(in_memory)
    for name, module in _linears(offloaded).items():
        weight = module.weight.detach().cpu()
        assert ((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all(), name
        torch.testing.assert_close(weight, expected[name].weight.detach())


def test_every_linear_of_a_layer_is_calibrated_on_the_layers_own_inputs(tiny_llama):
    """As in the paper: the first layer's Linears all get the Hessians of the dense model's
    inputs (o_proj not on the pruned q/k/v, down_proj not on the pruned gate/up)."""
    layer = tiny_llama.model.layers[0]
    names = [n for n, _ in layer.named_modules() if n.endswith(LINEARS)]
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        layer.get_submodule(n).register_forward_pre_hook(
            lambda module, args, n=n: seen[n].append(
                args[0].detach().reshape(-1, args[0].shape[-1])
            )
        )
        for n in names
    ]
    data = random_data()
    with torch.no_grad():
        tiny_llama(input_ids=torch.tensor(data["input_ids"]))
    for handle in handles:
        handle.remove()
    expected = {}
    for n in names:
        hessian, _ = accumulate_hessian(torch.cat(seen[n]), dtype=torch.float64)
        weight = layer.get_submodule(n).weight.detach()
        expected[n] = sparsegpt_prune(weight, hessian, 0.5, block_size=16).weight

    recipe = [SparseGPTModifier(sparsity=0.5, block_size=16, ignore=["re:.*lm_head"])]
    model = oneshot(tiny_llama, recipe, data, pipeline="sequential")
    for n in names:
        got = model.model.layers[0].get_submodule(n).weight.detach()
        assert ((got == 0) == (expected[n] == 0)).float().mean() > 0.99, n
        torch.testing.assert_close(got, expected[n], atol=1e-4, rtol=1e-3, msg=n)


def test_mask_structure_prunes_n_of_m_as_llmcompressor_reads_it(tiny_llama):
    """llm-compressor's SparseGPT and Wanda prune N of every M (``topk(N, largest=False)``
    in each group): "1:4" is 25% sparsity, not 75%."""
    recipe = [SparseGPTModifier(mask_structure="1:4", block_size=16, ignore=["re:.*lm_head"])]
    model = oneshot(tiny_llama, recipe, random_data())
    for name, module in _linears(model).items():
        zeros = (module.weight.detach().reshape(-1, 4) == 0).sum(dim=1)
        assert (zeros == 1).all(), name
    # the "keep N" reading of the same string is refused with what to write instead
    with pytest.raises(ValidationError, match="write mask_structure '3:4'"):
        SparseGPTModifier(mask_structure="1:4", sparsity=0.75)
    SparseGPTModifier(mask_structure="1:4", sparsity=0.25)  # llm-compressor's meaning
    with pytest.raises(ValidationError, match="contradicts mask_structure '2:4'"):
        SparseGPTModifier(mask_structure="2:4", sparsity=0.6)
    from compressor.modifiers.pruning.compat.llmcompressor import MagnitudePruningModifier

    with pytest.raises(ValidationError, match="'1:4' is ambiguous"):
        MagnitudePruningModifier(final_sparsity=0.75, mask_structure="1:4")

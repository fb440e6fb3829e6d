"""The sparsity a checkpoint records: compressed-tensors' sparsity_config, measured on the
weights, written with and without quantization, and what transformers does on reload."""

import json

import pytest
import torch
from compressed_tensors.utils.helpers import pack_bitmasks
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from compressor import Recipe, oneshot, save_compressed
from compressor.checkpoint.model_card import model_card
from compressor.checkpoint.sparsity import n_m_structure, sparsity_config
from compressor.modifiers import GPTQModifier, SparseGPTModifier, WandaPruningModifier

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_data(count=8, length=32):
    gen = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"input_ids": torch.randint(0, 128, (count, length), generator=gen)})


def _projections(model):
    return {n: m for n, m in model.named_modules() if n.endswith(PROJ)}


def _reload_and_compare(model, directory):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        expected, got = model(ids).logits, reloaded(ids).logits
    return reloaded, expected, got


def test_n_m_structure_is_the_zeros_in_every_group():
    weight = torch.randn(4, 8)
    assert n_m_structure(weight) is None
    weight.view(-1, 4)[:, :2] = 0
    assert n_m_structure(weight) == (2, 4)
    weight.view(-1, 4)[:, 2] = 0
    assert n_m_structure(weight) == (3, 4)


def _structure_by_definition(weight):
    """The first structure (largest N first within the smaller M) whose every group of M
    consecutive inputs holds at least N zeros, checked one structure at a time."""
    for pruned, group in ((3, 4), (2, 4), (1, 4), (6, 8), (4, 8), (2, 8)):
        if weight.shape[1] % group == 0:
            zeros = (weight.reshape(-1, group) == 0).sum(dim=1)
            if bool((zeros >= pruned).all()):
                return pruned, group
    return None


def test_n_m_structure_agrees_with_its_definition_on_every_mix_of_groups():
    gen = torch.Generator().manual_seed(0)
    for width in (8, 12, 16, 6):
        for keep_per_group in range(0, 9):
            # rows whose groups of 8 keep at most keep_per_group values, plus random zeros
            weight = torch.randn(6, width, generator=gen)
            if width % 8 == 0:
                view = weight.view(-1, 8)
                view[:, keep_per_group:] = 0
            weight[torch.rand(weight.shape, generator=gen) < 0.2] = 0
            assert n_m_structure(weight) == _structure_by_definition(weight), (width, weight)
    assert n_m_structure(torch.zeros(3, 4, 2)) is None  # not a 2-D weight


def test_two_of_four_checkpoint_records_its_structure_and_reloads_with_exact_zeros(
    tiny_llama, tmp_path
):
    recipe = [SparseGPTModifier(mask_structure="2:4", block_size=16, ignore=["re:.*lm_head"])]
    model = oneshot(tiny_llama, recipe, random_data())
    save_compressed(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    sparsity = config["sparsity_config"]
    assert sparsity["format"] == "dense" and sparsity["sparsity_structure"] == "2:4"
    assert sparsity["targets"] == ["Linear"] and sparsity["ignore"] == ["lm_head"]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    assert sparsity["global_sparsity"] == pytest.approx(
        zeros / sum(m.weight.numel() for m in linears), abs=1e-6
    )
    assert "config_groups" not in config  # not quantized
    # after a pruning session, the model's own save_pretrained writes the same
    model.save_pretrained(tmp_path / "own")
    own = json.loads((tmp_path / "own" / "config.json").read_text())["quantization_config"]
    assert own["sparsity_config"] == sparsity

    reloaded, expected, got = _reload_and_compare(model, tmp_path)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for name, module in _projections(reloaded).items():
        groups = module.weight.detach().reshape(-1, 4)
        assert ((groups == 0).sum(dim=1) >= 2).all(), name

    card = model_card(model, Recipe.from_modifiers(recipe))
    assert "- structure: 2:4 (at least 2 zeros in every 4 consecutive inputs)" in card
    assert "not quantized" in card


def test_sparse_then_quantized_checkpoint_records_both(tiny_llama, tmp_path):
    weights = {"num_bits": 8, "strategy": "channel", "symmetric": True}
    recipe = [
        WandaPruningModifier(sparsity=0.5, targets=["re:model.layers.\\d+$"]),
        GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}),
    ]
    model = oneshot(tiny_llama, recipe, random_data())
    save_compressed(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    groups = config["config_groups"].values()
    assert [g["weights"]["num_bits"] for g in groups] == [8]  # quantized
    sparsity = config["sparsity_config"]
    # lm_head is quantized but not pruned: the dense one ignored
    assert sparsity["sparsity_structure"] == "unstructured"
    assert sparsity["targets"] == ["Linear"] and sparsity["ignore"] == ["lm_head"]
    reloaded, expected, got = _reload_and_compare(model, tmp_path)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for name, module in _projections(reloaded).items():
        assert (module.weight == 0).float().mean() >= 0.5, name
    card = model_card(model, Recipe.from_modifiers(recipe))
    assert "also quantized (below)" in card and "## Quantization" in card


def test_a_dense_model_records_no_sparsity(tiny_llama, tmp_path):
    assert sparsity_config(tiny_llama) is None
    save_compressed(tiny_llama, tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_transformers_does_not_decompress_a_sparse_bitmask_checkpoint(tiny_llama, tmp_path):
    """Why the format is dense: compressed-tensors 0.20 has no sparse-bitmask compressor, and
    transformers loads such a checkpoint with the weights missing (newly initialised). If
    this ever fails, a format that stores only the kept values may have become usable."""
    with torch.no_grad():
        for module in _projections(tiny_llama).values():
            module.weight.view(-1, 4)[:, :2] = 0
    tiny_llama.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    packed = {}
    for key, value in tensors.items():
        if key.endswith(tuple(f"{p}.weight" for p in PROJ)):
            prefix, kept = key[: -len("weight")], value != 0
            packed[prefix + "shape"] = torch.tensor(value.shape)
            packed[prefix + "compressed"] = value[kept]
            packed[prefix + "bitmask"] = pack_bitmasks(kept)
            offsets = kept.sum(dim=1).cumsum(0)
            packed[prefix + "row_offsets"] = torch.cat(
                [torch.zeros(1, dtype=torch.long), offsets[:-1]]
            )
        else:
            packed[key] = value
    save_file(packed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "sparsity_config": {"format": "sparse-bitmask", "sparsity_structure": "2:4"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert "model.layers.0.self_attn.q_proj.weight" in info["missing_keys"]
    assert not torch.equal(
        reloaded.model.layers[0].self_attn.q_proj.weight,
        tiny_llama.model.layers[0].self_attn.q_proj.weight,
    )


def test_quantization_alone_is_not_taken_for_sparsity(tiny_llama):
    """NVFP4's group scales are relative to a global scale: without it every weight would
    dequantize to zero and a dense model would read as 3:4 sparse."""
    from compressor.modifiers import QuantizationModifier

    model = oneshot(
        tiny_llama.to(torch.bfloat16),
        [QuantizationModifier(scheme="NVFP4A16", targets=["Linear"], ignore=["lm_head"])],
    )
    assert sparsity_config(model) is None

"""The save's own pack-quantized writer: the same tensors as compressed-tensors', its zeros
counted from the codes, and the save that leaves the model compressed (decompress=False)."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
from compressed_tensors.quantization.lifecycle.forward import quantize
from transformers import LlamaForCausalLM

from compressor import Recipe, create_session, save_compressed
from compressor.checkpoint.compressed import write_compressed
from compressor.checkpoint.directory import save_checkpoint
from compressor.checkpoint.packing import int_codes, pack_codes
from compressor.checkpoint.sparsity import linear_zeros
from compressor.modifiers import QuantizationModifier
from conftest import tiny_llama_config

CASES = [  # (bits, strategy, group size, symmetric, columns)
    (4, "group", 128, True, 256),
    (4, "group", 32, False, 96),
    (4, "channel", None, True, 100),  # 100 columns: the last word of a row padded
    (4, "channel", None, False, 36),
    (4, "tensor", None, True, 64),
    (8, "group", 64, True, 192),
    (8, "channel", None, False, 30),  # 30 columns: 8 bits padded to a whole word
    (8, "tensor", None, False, 64),
]


def _scale_shape(strategy, group_size, rows, columns):
    if strategy == "group":
        return rows, columns // group_size
    return (rows, 1) if strategy == "channel" else (1,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bits", "strategy", "group_size", "symmetric", "columns"), CASES)
def test_codes_and_words_equal_compressed_tensors(
    bits, strategy, group_size, symmetric, columns, dtype
):
    torch.manual_seed(bits + columns)
    rows = 48
    args = QuantizationArgs(
        num_bits=bits, strategy=strategy, group_size=group_size, symmetric=symmetric
    )
    weight = torch.randn(rows, columns).to(dtype)
    weight[:, :7] = 0  # pruned weights
    weight[0, 0] = 1e6  # clamped
    shape = _scale_shape(strategy, group_size, rows, columns)
    scale = (torch.rand(shape) * 0.2 + 0.01).to(dtype)
    half = 2 ** (bits - 1)
    zero_point = None if symmetric else torch.randint(-half, half, shape, dtype=torch.int8)
    expected = quantize(weight, scale, zero_point, args, dtype=torch.int8)
    codes = int_codes(weight, scale, zero_point, args)
    assert torch.equal(codes, expected)
    assert torch.equal(pack_codes(codes, bits), pack_to_int32(expected, bits))


def test_pack_codes_refuses_other_widths():
    with pytest.raises(ValueError, match="4 or 8"):
        pack_codes(torch.zeros(2, 32, dtype=torch.int8), 3)


def _model(seed=0):
    torch.manual_seed(seed)
    config = tiny_llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    return LlamaForCausalLM(config).eval()


def _prune_2_of_4(model):
    """Zero the two smallest of every four consecutive inputs of the decoder's Linears."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                groups = module.weight.reshape(-1, 4)
                smallest = groups.abs().argsort(dim=1)[:, :2]
                groups.scatter_(1, smallest, 0.0)


def _quantized(config_groups=None, scheme=None, prune=False, seed=0):
    model = _model(seed)
    if prune:
        _prune_2_of_4(model)
    modifier = QuantizationModifier(scheme=scheme, config_groups=config_groups, ignore=["lm_head"])
    with create_session() as session:
        session.initialize(model, [modifier])
        session.calibration_epoch_start()
        session.calibration_epoch_end()
        session.finalize()
    return model, modifier


ASYMMETRIC_W4 = {
    "g": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32},
    }
}
W4_TENSOR = {
    "g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "tensor"}},
}
RECIPES = {  # name: (scheme, config_groups, 2:4 pruned first)
    "W4A16": ("W4A16", None, False),
    "W4A16 after 2:4": ("W4A16", None, True),
    "W8A16": ("W8A16", None, False),
    "asymmetric W4 g32": (None, ASYMMETRIC_W4, False),
    "W4 per tensor": (None, W4_TENSOR, False),
    "W8A8 (int-quantized, compressed-tensors)": ("W8A8", None, False),
    "FP8 (compressed-tensors)": ("FP8_DYNAMIC", None, True),
}


def _digests(directory):
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.is_file()
    }


def _compressed_tensors_save(model, directory):
    """The checkpoint compressed-tensors' own compressor writes (no sparsity_config)."""
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    LlamaForCausalLM.save_pretrained(model, directory)
    compressor.update_config(str(directory))


@pytest.mark.parametrize("name", list(RECIPES))
def test_checkpoint_is_the_same_with_or_without_decompressing(name, tmp_path):
    scheme, groups, prune = RECIPES[name]
    kept, modifier = _quantized(groups, scheme, prune)
    left, reference, counted = (copy.deepcopy(kept) for _ in range(3))
    recipe = Recipe.from_modifiers([modifier])
    ids = torch.randint(0, kept.config.vocab_size, (1, 12))
    with torch.no_grad():
        logits = kept(ids).logits
    # what the weights the model computes with hold, read before any save
    expected_zeros = linear_zeros(kept)

    save_checkpoint(kept, tmp_path / "kept", recipe)
    save_checkpoint(left, tmp_path / "left", recipe, decompress=False)
    assert _digests(tmp_path / "kept") == _digests(tmp_path / "left")  # weights, config, card
    _compressed_tensors_save(reference, tmp_path / "ct")
    ours = _digests(tmp_path / "left")["model.safetensors"]
    assert ours == _digests(tmp_path / "ct")["model.safetensors"]
    # the zeros counted from the codes are those of the weights the model computes with
    assert write_compressed(counted, tmp_path / "counted", decompress=False) == expected_zeros
    config = json.loads((tmp_path / "left" / "config.json").read_text())
    sparsity = config["quantization_config"].get("sparsity_config")
    assert (sparsity or {}).get("sparsity_structure") == ("2:4" if prune else None)
    # kept: the weights are back; left: compressed as written, and a forward pass (which
    # decompresses it) computes as before
    kept_up, left_up = kept.model.layers[0].mlp.up_proj, left.model.layers[0].mlp.up_proj
    assert kept_up.quantization_status != QuantizationStatus.COMPRESSED
    assert kept_up.weight.dtype == torch.float32
    assert left_up.quantization_status == QuantizationStatus.COMPRESSED
    assert getattr(left_up, "weight", torch.zeros(1, dtype=torch.int8)).dtype != torch.float32
    with torch.no_grad():
        assert torch.allclose(kept(ids).logits, logits, atol=1e-6)
        assert torch.allclose(left(ids).logits, logits, atol=1e-6)


def test_a_save_left_compressed_is_refused_a_second_save(tmp_path):
    model, _ = _quantized(scheme="W4A16")
    save_compressed(model, tmp_path / "first", decompress=False)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj.*decompress=False"):
        save_compressed(model, tmp_path / "second")
    assert not (tmp_path / "second").exists()


class _ThreadsSeen(LlamaForCausalLM):
    """A Llama that records torch's CPU thread count when it is written."""

    seen: list[int] = []

    def save_pretrained(self, *args, **kwargs):
        self.seen.append(torch.get_num_threads())
        return super().save_pretrained(*args, **kwargs)


def test_the_save_runs_on_one_cpu_thread_and_restores_the_count(tmp_path):
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    model = _ThreadsSeen(config).eval()
    modifier = QuantizationModifier(scheme="W4A16", ignore=["lm_head"])
    with create_session() as session:
        session.initialize(model, [modifier])
        session.finalize()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        save_compressed(model, tmp_path / "ckpt")
        assert _ThreadsSeen.seen == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)

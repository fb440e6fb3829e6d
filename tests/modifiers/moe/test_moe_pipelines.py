"""MoE layers through the sequential pipeline (staged GPTQ where the layer allows it) and
with their layers offloaded to disk: the same result as in memory."""

import pytest
import torch
from compressed_tensors.offload.cache import OffloadCache
from datasets import Dataset
from loguru import logger
from transformers import AutoModelForCausalLM

from compressor import oneshot
from compressor.modifiers import GPTQModifier
from compressor.modifiers.moe import LinearExperts
from moe_models import tiny_moe


@pytest.fixture
def logged():
    """Every message logged (INFO and up) during the test, one string each."""
    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(str(m)), level="INFO")
    yield messages
    logger.remove(handle)


W4_GROUP16 = {
    "targets": ["Linear"],
    "weights": {"num_bits": 4, "strategy": "group", "group_size": 16, "symmetric": True},
}


def calibration(rows=4, length=16):
    gen = torch.Generator().manual_seed(3)
    return Dataset.from_dict({"input_ids": torch.randint(0, 128, (rows, length), generator=gen)})


def expert_weights(model):
    return {
        f"{name}.{n}": p.detach().clone()
        for name, experts in model.named_modules()
        if isinstance(experts, LinearExperts)
        for n, p in experts.named_parameters()
        if n.endswith(".weight")
    }


def gptq(pipeline, **fields):
    return dict(
        recipe=[GPTQModifier(config_groups={"g": W4_GROUP16}, ignore=["lm_head"], **fields)],
        dataset=calibration(),
        num_calibration_samples=4,
        pipeline=pipeline,
    )


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_sequential_gptq_equals_basic_gptq_on_moe_layers(family, logged):
    """Each layer calibrated on the quantized layers before it differs from the basic
    pipeline's; but the first layer sees the same inputs, so its experts match exactly."""
    sequential = oneshot(tiny_moe(family), **gptq("sequential"))
    basic = oneshot(tiny_moe(family), **gptq("basic"))
    seq, bas = expert_weights(sequential), expert_weights(basic)
    assert seq.keys() == bas.keys() and len(seq) == 2 * 8 * 3
    for name in seq:
        if name.startswith("model.layers.0."):
            torch.testing.assert_close(seq[name], bas[name], atol=1e-6, rtol=0)
    assert any("calibrated whole" in m for m in logged)  # MoE layers are not staged


def test_moe_layers_offloaded_to_disk_give_the_in_memory_result(tmp_path):
    model = tiny_moe("qwen3_moe")
    model.save_pretrained(tmp_path / "fp")
    in_memory = oneshot(
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp").eval(), **gptq("sequential")
    )
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    offloaded = oneshot(offloaded, **gptq("sequential"), output_dir=tmp_path / "out")
    # the unfolded experts stayed on disk, one Linear at a time
    for experts in (m for m in offloaded.modules() if isinstance(m, LinearExperts)):
        for linear in (m for m in experts.modules() if isinstance(m, torch.nn.Linear)):
            assert isinstance(linear._parameters, OffloadCache)
            assert "disk" in type(linear._parameters).__name__.lower()
    expected, got = expert_weights(in_memory), expert_weights(offloaded)
    assert expected.keys() == got.keys() and len(got) == 2 * 8 * 3
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(reloaded(ids).logits, in_memory(ids).logits, atol=1e-4, rtol=0)

"""SparseGPT and Wanda on mixture-of-experts models: every expert pruned on statistics from
every calibration token, the routing left dense, the checkpoint reloaded."""

import pytest
import torch
from datasets import Dataset
from loguru import logger
from transformers import AutoModelForCausalLM

from compressor import oneshot
from compressor.modifiers import SparseGPTModifier, WandaPruningModifier
from compressor.modifiers.moe import LinearExperts
from moe_models import tiny_moe


@pytest.fixture
def logged():
    """Every message logged (INFO and up) during the test, one string each."""
    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(str(m)), level="INFO")
    yield messages
    logger.remove(handle)


def calibration(rows=4, length=16):
    gen = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"input_ids": torch.randint(0, 128, (rows, length), generator=gen)})


@pytest.mark.parametrize("modifier_class", [SparseGPTModifier, WandaPruningModifier])
def test_every_expert_is_pruned_and_the_model_reloads(modifier_class, tmp_path, logged):
    model = tiny_moe("qwen2_moe")
    gates = {n: p.detach().clone() for n, p in model.named_parameters() if "gate.weight" in n}
    modifier = modifier_class(sparsity=0.5, ignore=["lm_head"])
    model = oneshot(
        model,
        [modifier],
        dataset=calibration(),
        output_dir=tmp_path / "out",
        num_calibration_samples=4,
    )
    experts = [m for m in model.modules() if isinstance(m, LinearExperts)]
    assert len(experts) == 2
    for block in experts:
        for linear in block.modules():
            if isinstance(linear, torch.nn.Linear):
                zeros = (linear.weight == 0).float().mean().item()
                assert zeros == pytest.approx(0.5, abs=0.02)
    for name, param in model.named_parameters():
        if name in gates:  # the router and the shared expert's gate are left dense
            assert torch.equal(param, gates[name]), name
    coverage = [m for m in logged if "routed tokens per expert" in m]
    assert len(coverage) == 2 and all("64 token(s) each" in m for m in coverage)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-4, rtol=0)

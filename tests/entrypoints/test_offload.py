"""oneshot on a model loaded offloaded to disk: same result as in memory, one layer at a time."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.offload.cache import OffloadCache
from datasets import Dataset
from pydantic import PrivateAttr
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from compressor import Recipe, oneshot
from compressor.core.events import Event, EventType
from compressor.core.state import State
from compressor.modifiers.base import CalibrationTraits, Modifier
from conftest import tiny_llama_config

GPTQ_YAML = (
    "modifiers:\n"
    "  - GPTQModifier: {ignore: [lm_head], config_groups: {g: {targets: [Linear], weights:"
    " {num_bits: 4, strategy: group, group_size: 16, symmetric: true}}}}\n"
)
GPTQ = Recipe.from_yaml(GPTQ_YAML)
DISK_LAYERS = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def calibration():
    gen = torch.Generator().manual_seed(3)
    return Dataset.from_dict({"input_ids": torch.randint(0, 128, (8, 24), generator=gen)})


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    model.save_pretrained(tmp_path / "fp")
    return tmp_path


def load_offloaded(checkpoint):
    """As a user loads a model too large for memory: decoder layers offloaded to disk."""
    return AutoModelForCausalLM.from_pretrained(
        checkpoint / "fp", device_map=DISK_LAYERS, offload_folder=checkpoint / "offload"
    ).eval()


@Modifier.register()
class OnloadedProbe(Modifier):
    """At each layer's (or stage's) end: how many offloaded tensors are held in memory. It
    follows GPTQ's stages, so that the offloaded run takes the same path as the other."""

    _held: list = PrivateAttr(default_factory=list)

    def requires_calibration_data(self) -> bool:
        return True

    def calibration_traits(self) -> CalibrationTraits:
        return CalibrationTraits(
            supports_offloaded_models=True, reads_outputs=False, merges_batches=True, in_stages=True
        )

    def on_update(self, state: State, event: Event) -> None:
        if event.type_ == EventType.SEQUENTIAL_EPOCH_END:
            layers = state.model.model.layers
            inside = [
                i
                for i, layer in enumerate(layers)
                if any(p is m for m in layer.modules() for p in event.modules)
            ]
            index = inside[0] if inside else None
            if index is None:  # the basic pipeline's one epoch: the whole model
                return
            own = sum(len(m._parameters) for m in layers[index].modules())
            self._held.append((index, len(OffloadCache.keep_onloaded_values), own))


@pytest.mark.parametrize("pipeline", ["sequential", "basic"])
def test_gptq_on_a_disk_offloaded_model_equals_the_in_memory_run(checkpoint, pipeline):
    in_memory = AutoModelForCausalLM.from_pretrained(checkpoint / "fp").eval()
    oneshot(in_memory, GPTQ, calibration(), pipeline=pipeline)

    offloaded = load_offloaded(checkpoint)
    assert offloaded.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # accelerate
    probe = OnloadedProbe()
    out = oneshot(
        offloaded,
        [*Recipe.from_yaml(GPTQ_YAML).modifiers, probe],
        calibration(),
        pipeline=pipeline,
        output_dir=checkpoint / "quantized",
    )
    # the layers are still offloaded (converted to compressed-tensors' disk offloading)
    q_proj = out.model.layers[1].self_attn.q_proj
    assert (
        isinstance(q_proj._parameters, OffloadCache) and q_proj._parameters.offload_device == "disk"
    )
    ids = torch.tensor([[5, 9, 1, 77, 3, 12, 40, 2]])
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint / "quantized").eval()
    original = AutoModelForCausalLM.from_pretrained(checkpoint / "fp").eval()
    with torch.no_grad():
        expected = in_memory(ids).logits
        assert not torch.allclose(expected, original(ids).logits)  # GPTQ changed something
        torch.testing.assert_close(out(ids).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-6)
    if pipeline == "sequential":
        # only the layer being compressed was held in memory at its end
        assert sorted({index for index, _, _ in probe._held}) == [0, 1]
        assert all(0 < held <= own for _, held, own in probe._held), probe._held


W4_GROUP16 = (
    "{g: {targets: [Linear], weights: {num_bits: 4, strategy: group, group_size: 16,"
    " symmetric: true}}}"
)


@pytest.mark.parametrize(
    "fields, pipeline",
    [
        (f"config_groups: {W4_GROUP16}", "datafree"),
        ("scheme: W8A8", "sequential"),
        ("scheme: W8A8", "basic"),
        ("scheme: FP8_DYNAMIC", "auto"),
    ],
)
def test_quantization_on_an_offloaded_model_equals_the_in_memory_run(checkpoint, fields, pipeline):
    def recipe():
        return Recipe.from_yaml(
            f"modifiers:\n  - QuantizationModifier: {{{fields}, targets: [Linear],"
            " ignore: [lm_head]}\n"
        )

    data = None if pipeline in ("datafree", "auto") else calibration()
    in_memory = AutoModelForCausalLM.from_pretrained(checkpoint / "fp").eval()
    oneshot(in_memory, recipe(), data, pipeline=pipeline)
    out = oneshot(
        load_offloaded(checkpoint),
        recipe(),
        data,
        pipeline=pipeline,
        output_dir=checkpoint / "quantized",
    )
    ids = torch.tensor([[5, 9, 1, 77, 3, 12, 40, 2]])
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint / "quantized").eval()
    original = AutoModelForCausalLM.from_pretrained(checkpoint / "fp").eval()
    with torch.no_grad():
        expected = in_memory(ids).logits
        assert not torch.allclose(expected, original(ids).logits)
        torch.testing.assert_close(out(ids).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-5)


def test_an_offloaded_model_is_refused_where_updates_would_be_lost(checkpoint):
    prune = Recipe.from_yaml(
        "modifiers:\n  - SparsePruningModifier: {sparsity: 0.5, targets: [Linear],"
        " ignore: [lm_head]}\n"
    )
    with pytest.raises(ValueError, match=r"offloaded.*SparsePruningModifier do\(es\) not support"):
        oneshot(load_offloaded(checkpoint), prune, calibration())
    with pytest.raises(ValueError, match="device='cpu' with an offloaded model"):
        oneshot(load_offloaded(checkpoint), GPTQ, calibration(), device="cpu")


def test_accelerate_offloading_that_cannot_be_converted_is_a_clear_error(checkpoint):
    from accelerate import cpu_offload

    model = AutoModelForCausalLM.from_pretrained(checkpoint / "fp").eval()
    cpu_offload(model, execution_device="cpu")
    with pytest.raises(
        ValueError, match="dispatched with accelerate hooks that cannot be converted"
    ):
        oneshot(model, GPTQ, calibration())


def test_oneshot_loads_a_checkpoint_with_its_layers_on_disk(checkpoint):
    in_memory = oneshot(checkpoint / "fp", GPTQ, calibration())
    out = oneshot(
        checkpoint / "fp",
        Recipe.from_yaml(GPTQ_YAML),
        calibration(),
        offload_folder=checkpoint / "offload",
    )
    for index in (0, 1):
        q_proj = out.model.layers[index].self_attn.q_proj
        assert q_proj._parameters.offload_device == "disk"
    assert out.lm_head._parameters.offload_device.type == "cpu"  # the rest stays in memory
    ids = torch.tensor([[5, 9, 1, 77, 3, 12, 40, 2]])
    with torch.no_grad():
        torch.testing.assert_close(out(ids).logits, in_memory(ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="offload_folder applies when model is a checkpoint"):
        oneshot(in_memory, GPTQ, calibration(), offload_folder=checkpoint / "offload")


def test_cli_offload_folder(tmp_path, capsys, stories_model_path, tinystories_text):
    from compressor.entrypoints.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "modifiers:\n  - GPTQModifier: {ignore: [lm_head], config_groups: {g: {targets:"
        " [Linear], weights: {num_bits: 4, strategy: channel, symmetric: true}}}}\n"
    )
    data = tmp_path / "calib.txt"
    data.write_text(tinystories_text[:20000])
    args = ["oneshot", "--model", str(stories_model_path), "--recipe", str(recipe)]
    args += ["--dataset", str(data), "--num-samples", "4", "--max-seq-length", "64"]
    assert main([*args, "--output", str(tmp_path / "mem")]) == 0
    disk = ["--output", str(tmp_path / "disk"), "--offload-folder", str(tmp_path / "off")]
    assert main([*args, *disk]) == 0
    assert "saved the compressed model" in capsys.readouterr().out
    ids = torch.tensor([[1, 200, 31, 400, 5, 60, 7, 80]])
    mem = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").eval()
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, mem(ids).logits, rtol=0, atol=1e-6)


def test_a_model_dispatched_by_accelerate_without_offloading_takes_every_modifier(checkpoint):
    """accelerate's hooks (a multi-device device_map) are converted; nothing is offloaded, so
    modifiers that write weights in place work as on a plain model."""
    from accelerate import dispatch_model

    placement = {name: "cpu" for name in DISK_LAYERS}
    prune = (
        "modifiers:\n  - SparsePruningModifier: {sparsity: 0.5, targets: [Linear],"
        " ignore: [lm_head]}\n"
    )
    for yaml in (GPTQ_YAML, prune):
        plain = AutoModelForCausalLM.from_pretrained(checkpoint / "fp").eval()
        oneshot(plain, Recipe.from_yaml(yaml), calibration())
        dispatched = AutoModelForCausalLM.from_pretrained(checkpoint / "fp").eval()
        dispatch_model(dispatched, device_map=placement, force_hooks=True)
        assert dispatched.model.layers[0].self_attn.q_proj._hf_hook is not None
        out = oneshot(dispatched, Recipe.from_yaml(yaml), calibration())
        ids = torch.tensor([[5, 9, 1, 77, 3, 12, 40, 2]])
        with torch.no_grad():
            torch.testing.assert_close(out(ids).logits, plain(ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="device='cpu' with a model dispatched over devices"):
        dispatched = AutoModelForCausalLM.from_pretrained(checkpoint / "fp").eval()
        dispatch_model(dispatched, device_map=placement, force_hooks=True)
        oneshot(dispatched, GPTQ, calibration(), device="cpu")


AWQ_GPTQ_YAML = (
    "modifiers:\n"
    "  - AWQModifier: {n_grid: 6}\n"
    "  - GPTQModifier: {ignore: [lm_head], config_groups: {g: {targets: [Linear], weights:"
    " {num_bits: 4, strategy: group, group_size: 16, symmetric: true}}}}\n"
)


def test_awq_then_gptq_on_a_disk_offloaded_model_equals_the_in_memory_run(checkpoint):
    in_memory = AutoModelForCausalLM.from_pretrained(checkpoint / "fp").eval()
    oneshot(in_memory, Recipe.from_yaml(AWQ_GPTQ_YAML), calibration())
    out = oneshot(
        load_offloaded(checkpoint),
        Recipe.from_yaml(AWQ_GPTQ_YAML),
        calibration(),
        output_dir=checkpoint / "awq",
    )
    ids = torch.tensor([[5, 9, 1, 77, 3, 12, 40, 2]])
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint / "awq").eval()
    norm = out.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))  # AWQ's scales were folded
    with torch.no_grad():
        expected = in_memory(ids).logits
        torch.testing.assert_close(out(ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-5)

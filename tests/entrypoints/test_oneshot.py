import copy
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from calibration_modifiers import FailAtLayer, LayerShrinker
from compressor import Recipe, oneshot
from compressor.checkpoint import directory as saving
from compressor.modifiers import HooksMixin


def _leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".partial-" in n)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_oneshot_compresses_a_checkpoint_and_saves_it(tmp_path, stories_model_path):
    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time there was a little girl named Lily. " * 60)
    out = tmp_path / "out"
    original = LlamaForCausalLM.from_pretrained(stories_model_path)
    model = oneshot(
        stories_model_path,
        [LayerShrinker()],
        text,
        num_calibration_samples=4,
        max_seq_length=32,
        batch_size=2,
        output_dir=out,
    )
    layer0 = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(
        model.state_dict()[layer0], 0.5 * original.state_dict()[layer0], rtol=0, atol=0
    )
    assert {"config.json", "recipe.yaml", "tokenizer.json"} <= set(os.listdir(out))
    reloaded = LlamaForCausalLM.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert Recipe.from_file(out / "recipe.yaml") == Recipe.from_modifiers([LayerShrinker()])
    AutoTokenizer.from_pretrained(out)
    assert _leftovers(tmp_path) == []


def test_oneshot_data_free_on_text_sampled_from_the_model(tiny_llama):
    before = _weights(tiny_llama)
    shrinker = LayerShrinker()
    oneshot(tiny_llama, [shrinker], "self", num_calibration_samples=2, max_seq_length=8)
    assert len(shrinker._inputs[0]) == 2 and shrinker._inputs[0][0].shape[1] == 8
    after = tiny_llama.state_dict()
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(after[name], 0.5 * before[name])


def test_a_modifier_that_needs_data_fails_early_without_it(tmp_path):
    # the model path does not exist: the data check comes before any loading
    with pytest.raises(ValueError, match="LayerShrinker need.*calibration data.*dataset='self'"):
        oneshot(tmp_path / "no-model", [LayerShrinker()])
    with pytest.raises(ValueError, match="pipeline='basic' runs calibration data"):
        oneshot(torch.nn.Linear(2, 2), [], pipeline="basic")


def test_checks_run_in_order_and_before_the_model_is_loaded(tmp_path):
    # each call fixes the problem the one before it reported; the model never exists
    missing, existing = tmp_path / "no-model", tmp_path / "ckpt"
    existing.mkdir()
    with pytest.raises(ValueError, match="num_calibration_samples"):
        oneshot(missing, "no recipe", output_dir=existing, num_calibration_samples=0)
    with pytest.raises(FileExistsError, match="already exists"):
        oneshot(missing, "no recipe", output_dir=existing)
    with pytest.raises(ValueError, match="recipe='no recipe' is neither"):
        oneshot(missing, "no recipe")
    with pytest.raises(ValueError, match="LayerShrinker need.*calibration data"):
        oneshot(missing, [LayerShrinker()])
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory"):  # only now
        oneshot(missing, [LayerShrinker()], "self")


def test_an_existing_output_dir_is_refused_before_any_work(tiny_llama, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("good checkpoint")
    before = _weights(tiny_llama)
    with pytest.raises(FileExistsError, match=f"output_dir {out} already exists.*overwrite=True"):
        oneshot(tiny_llama, [LayerShrinker()], "self", output_dir=out)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    assert os.listdir(out) == ["keep.txt"]


def test_overwrite_replaces_the_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a checkpoint
    (out / "stale.txt").write_text("old")
    oneshot(tiny_llama, [LayerShrinker()], "self", num_calibration_samples=1,
            max_seq_length=4, output_dir=out, overwrite=True)  # fmt: skip
    assert "stale.txt" not in os.listdir(out) and (out / "recipe.yaml").is_file()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_run_that_fails_midway_writes_nothing_and_removes_its_hooks(tiny_llama, tmp_path):
    out = tmp_path / "ckpt"
    failing = FailAtLayer(layer=1)
    with pytest.raises(RuntimeError, match="failing on purpose at layer 1"):
        oneshot(tiny_llama, [failing], "self", num_calibration_samples=1, max_seq_length=4,
                output_dir=out)  # fmt: skip
    assert not out.exists() and os.listdir(tmp_path) == []
    assert failing.num_hooks == 0 and not HooksMixin._HOOKS_DISABLED


def _failing_write(model, directory, compressed, decompress):
    (directory / "model.safetensors").write_bytes(b"half")
    raise OSError("disk full")


def test_a_failed_save_leaves_no_half_checkpoint(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(saving, "_save_model", _failing_write)
    out = tmp_path / "ckpt"
    with pytest.raises(OSError, match="disk full"):
        oneshot(tiny_llama, [LayerShrinker()], "self", num_calibration_samples=1,
                max_seq_length=4, output_dir=out)  # fmt: skip
    assert os.listdir(tmp_path) == []


def test_a_failed_save_with_overwrite_keeps_the_old_checkpoint(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "recipe.yaml").write_text("good checkpoint")
    monkeypatch.setattr(saving, "_save_model", _failing_write)
    recipe = Recipe.from_modifiers([LayerShrinker()])
    with pytest.raises(OSError, match="disk full"):
        saving.save_checkpoint(tiny_llama, out, recipe, overwrite=True)
    assert os.listdir(out) == ["recipe.yaml"] and os.listdir(tmp_path) == ["ckpt"]


def test_a_failed_rename_with_overwrite_restores_the_old_checkpoint(
    tiny_llama, tmp_path, monkeypatch
):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "recipe.yaml").write_text("good checkpoint")
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new checkpoint's move into place
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(saving.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        saving.save_checkpoint(tiny_llama, out, Recipe.from_modifiers([]), overwrite=True)
    assert os.listdir(out) == ["recipe.yaml"] and os.listdir(tmp_path) == ["ckpt"]


def test_a_quantized_model_is_saved_compressed_and_reloads(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from compressor import QuantizationModifier

    weights = {"num_bits": 4, "type": "int", "symmetric": True}
    weights |= {"strategy": "group", "group_size": 16}
    recipe = [
        QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}})
    ]
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_logits = tiny_llama(ids).logits
    model = oneshot(tiny_llama, recipe, output_dir=tmp_path / "packed")
    oneshot(tiny_llama, Recipe.from_modifiers([]), output_dir=tmp_path / "dense",
            save_compressed=False)  # fmt: skip
    with torch.no_grad():
        quantized_logits = model(ids).logits
    assert not torch.allclose(quantized_logits, dense_logits, atol=1e-4)  # it did quantize

    config = (tmp_path / "packed" / "config.json").read_text()
    assert '"quantization_config"' in config and "pack-quantized" in config
    packed = (tmp_path / "packed" / "model.safetensors").stat().st_size
    dense = (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert packed < 0.75 * dense  # the decoder Linears (most weights) hold 4 bits, not 32
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, quantized_logits, rtol=1e-4, atol=1e-4)


def test_a_caller_done_with_the_model_gets_the_same_checkpoint_without_decompressing(
    tiny_llama, tmp_path
):
    from compressed_tensors.quantization import QuantizationStatus

    from compressor import QuantizationModifier

    weights = {"num_bits": 4, "strategy": "group", "group_size": 16}

    def run(name, **kwargs):
        groups = {"g": {"targets": ["Linear"], "weights": weights}}
        recipe = [QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
        model = oneshot(copy.deepcopy(tiny_llama), recipe, output_dir=tmp_path / name, **kwargs)
        return model.model.layers[0].self_attn.q_proj

    kept = run("kept")
    left = run("left", decompress_after_save=False)  # what the CLI passes
    assert kept.quantization_status == QuantizationStatus.DECOMPRESSED
    assert left.quantization_status == QuantizationStatus.COMPRESSED  # left as written
    for name in ("model.safetensors", "config.json", "README.md", "recipe.yaml"):
        assert (tmp_path / "kept" / name).read_bytes() == (tmp_path / "left" / name).read_bytes()


def test_one_recipe_object_can_compress_two_models_alike(tiny_llama):
    """A Recipe is configuration: a second oneshot with it runs fresh modifiers and gives the
    same result, and the first run's modifiers are left as they ended."""
    recipe = Recipe.from_yaml(
        """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: [lm_head]
      config_groups:
        g: {targets: [Linear], weights: {num_bits: 4, strategy: group, group_size: 16}}
"""
    )
    from datasets import Dataset

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids})
    twin = copy.deepcopy(tiny_llama)
    first = oneshot(tiny_llama, recipe, data)
    (used,) = recipe.modifiers
    second = oneshot(twin, recipe, data)
    assert recipe.modifiers == [used] and used.finalized
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_overwrite_of_a_directory_that_is_not_a_checkpoint_is_refused_before_any_work(
    tiny_llama, tmp_path
):
    models = tmp_path / "models"
    (models / "other").mkdir(parents=True)
    (models / "notes.txt").write_text("notes")
    before = _weights(tiny_llama)
    with pytest.raises(FileExistsError, match="is not a checkpoint.*choose another output_dir"):
        oneshot(tiny_llama, [LayerShrinker()], "self", output_dir=models, overwrite=True)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    assert sorted(os.listdir(models)) == ["notes.txt", "other"]


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_an_offload_folder_overlapping_output_dir_is_refused_before_loading(tmp_path, where):
    out = tmp_path / "ckpt"
    offload = {"same": out, "inside": out / "offload", "around": tmp_path}[where]
    # the model path does not exist: the check comes before loading
    with pytest.raises(ValueError, match="offload_folder=.* and output_dir=.* overlap"):
        oneshot(tmp_path / "no-model", [], output_dir=out, offload_folder=offload, overwrite=True)
    assert not out.exists()


@pytest.mark.parametrize("device", ["bogus", "cuda:7", "meta"])
def test_a_device_this_torch_cannot_use_is_refused_before_loading(tmp_path, device):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ValueError, match=rf"device='{device}'.*available here: cpu"):
        oneshot(tmp_path / "no-model", [LayerShrinker()], "self", device=device)


def test_oneshot_takes_what_llm_compressor_users_pass(tmp_path, stories_model_path, monkeypatch):
    """model, recipe and dataset as strings: a directory, a recipe file, a local json file."""
    import json

    import calibration_modifiers  # noqa: F401  (registers LayerShrinker for the recipe)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("oneshot_stage:\n  test_modifiers:\n    LayerShrinker: {}\n")
    rows = tmp_path / "calib.jsonl"
    rows.write_text(
        "".join(json.dumps({"text": f"Lily had {i} red balls."}) + "\n" for i in range(4))
    )
    original = LlamaForCausalLM.from_pretrained(stories_model_path)
    model = oneshot(str(stories_model_path), str(recipe), str(rows), num_calibration_samples=3)
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[name], 0.5 * original.state_dict()[name])
    # the same recipe as YAML text
    model = oneshot(
        str(stories_model_path), recipe.read_text(), str(rows), num_calibration_samples=3
    )
    assert torch.equal(model.state_dict()[name], 0.5 * original.state_dict()[name])


def test_a_hub_id_is_handed_to_from_pretrained_with_a_clear_error_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as info:
        oneshot("some-org/some-model", [LayerShrinker()], "self")
    message = str(info.value)
    assert "model 'some-org/some-model': no such local path" in message
    assert "read as a Hugging Face Hub id" in message

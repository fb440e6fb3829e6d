"""Saving a model whose decoder layers are on disk reads one shard at a time: the tensors
read back from disk and held at once never exceed one layer's, however many layers there
are, and the checkpoint equals the one saved from memory."""

from __future__ import annotations

import json
import weakref

import torch
from accelerate.utils import OffloadedWeightsLoader
from compressed_tensors.offload.cache import DiskCache, OffloadCache
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel

from compressor import Recipe, oneshot
from compressor.checkpoint.offloaded import largest_stored_layer_bytes
from conftest import tiny_llama_config

LAYERS = 6
W4_GROUP16 = Recipe.from_yaml(
    "modifiers:\n"
    "  - QuantizationModifier: {ignore: [lm_head], config_groups: {g: {targets: [Linear],"
    " weights: {num_bits: 4, strategy: group, group_size: 16, symmetric: true}}}}\n"
)


class ResidentReads:
    """Bytes of the tensors read back from disk that are alive at once, while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.now = self.most = self.total = 0

    def track(self, tensor):
        if not (self.active and isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"):
            return tensor
        # the bytes are handed out in a numpy array's memory: the array lives as long as any
        # tensor sharing that memory does (``state_dict`` keeps detached views, not the
        # tensor read), so its finalizer says when the bytes are really released
        flat = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        size = flat.nbytes
        self.now += size
        self.total += size
        self.most = max(self.most, self.now)
        weakref.finalize(flat, self._freed, size)
        return torch.from_numpy(flat).view(tensor.dtype).view(tensor.shape)

    def _freed(self, size: int) -> None:
        self.now -= size


def _spy_on_disk_reads(monkeypatch) -> ResidentReads:
    """Count every read from the offload folder (compressed-tensors' own and accelerate's),
    and only during ``save_pretrained``'s write."""
    reads = ResidentReads()
    onload, getitem = DiskCache.onload, OffloadedWeightsLoader.__getitem__
    monkeypatch.setattr(DiskCache, "onload", lambda self, t: reads.track(onload(self, t)))
    monkeypatch.setattr(
        OffloadedWeightsLoader, "__getitem__", lambda self, k: reads.track(getitem(self, k))
    )
    save = PreTrainedModel.save_pretrained

    def watched_save(self, *args, **kwargs):
        reads.active = True
        try:
            return save(self, *args, **kwargs)
        finally:
            reads.active = False

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", watched_save)
    return reads


def _saved_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return tensors


def _layer_bytes(tensors: dict[str, torch.Tensor], index: int) -> int:
    prefix = f"model.layers.{index}."
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(prefix))


def test_saving_from_disk_holds_one_layer_and_writes_the_in_memory_checkpoint(
    tmp_path, monkeypatch
):
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(num_hidden_layers=LAYERS)).save_pretrained(tmp_path / "fp")
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "fp").eval()
    oneshot(in_memory, W4_GROUP16, output_dir=tmp_path / "from_memory")

    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"} | {f"model.layers.{i}": "disk" for i in range(LAYERS)}  # fmt: skip
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    reads = _spy_on_disk_reads(monkeypatch)
    out = oneshot(offloaded, W4_GROUP16, output_dir=tmp_path / "from_disk")

    saved = _saved_tensors(tmp_path / "from_disk")
    assert saved.keys() == _saved_tensors(tmp_path / "from_memory").keys()
    for key, tensor in _saved_tensors(tmp_path / "from_memory").items():
        torch.testing.assert_close(saved[key], tensor, rtol=0, atol=0, msg=key)
    layers = [_layer_bytes(saved, i) for i in range(LAYERS)]
    # every layer was read back from disk for the write, but never more than one shard (at
    # most the largest layer) at once: the whole model would be LAYERS times as much
    assert reads.total >= sum(layers)
    assert 0 < reads.most <= max(layers) < sum(layers) / 2, (reads.most, layers)
    index = json.loads((tmp_path / "from_disk" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= LAYERS
    # the model is back on compressed-tensors' offloading, its layers still on disk
    q_proj = out.model.layers[LAYERS - 1].self_attn.q_proj
    assert isinstance(q_proj._parameters, OffloadCache)
    assert q_proj._parameters.offload_device == "disk"
    assert largest_stored_layer_bytes(out) > 0

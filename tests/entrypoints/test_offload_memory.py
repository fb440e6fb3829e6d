"""GPTQ on a model whose decoder layers are on disk holds one layer's worth of memory, whatever
the layer's index: nothing a layer's turn allocates (its onloaded weights, its Hessians, its
activations) outlives it."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from compressor import Recipe, oneshot
from conftest import tiny_llama_config

LAYERS = 6
GPTQ = (
    "modifiers:\n"
    "  - GPTQModifier: {ignore: [lm_head], config_groups: {g: {targets: [Linear], weights:"
    " {num_bits: 4, strategy: group, group_size: 16, symmetric: true}}}}\n"
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc_mallinfo2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2  # glibc 2.33 and later
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    return mallinfo2


MALLINFO2 = _glibc_mallinfo2()


def live_heap_bytes() -> int:
    """Bytes malloc has handed out and not taken back (heap blocks and mmapped blocks): what
    is alive, unlike the resident size, which also counts freed memory malloc keeps."""
    info = MALLINFO2()
    return info.uordblks + info.hblkhd


@pytest.mark.skipif(MALLINFO2 is None, reason="needs glibc's mallinfo2 to count live memory")
def test_memory_alive_as_each_layer_starts_does_not_grow_with_its_index(tmp_path):
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=64, intermediate_size=256, num_hidden_layers=LAYERS)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "fp")
    device_map = {name: "cpu" for name in ("model.embed_tokens", "model.norm", "lm_head")}
    device_map |= {"model.rotary_emb": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" for i in range(LAYERS)}
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    first_layer = LlamaForCausalLM(config).model.layers[0]
    layer_bytes = sum(p.numel() * p.element_size() for p in first_layer.parameters())
    alive: dict[int, int] = {}

    def on_first_call(index: int):
        # a layer's first module, at its first calibration forward: the previous layer's turn
        # is over, this one's weights are onloaded (the same size for every layer)
        def record(_module: torch.nn.Module, _args: tuple) -> None:
            alive.setdefault(index, live_heap_bytes())

        return record

    for index, layer in enumerate(model.model.layers):
        layer.self_attn.q_proj.register_forward_pre_hook(on_first_call(index))
    generator = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 128, (8, 24), generator=generator)
    oneshot(model, Recipe.from_yaml(GPTQ), Dataset.from_dict({"input_ids": rows}))

    assert sorted(alive) == list(range(LAYERS))
    # from the second layer on (the first starts before the pipeline's caches are built), what
    # is alive stays within a quarter of one layer's fp32 weights: a layer's weights, one of
    # its Hessians (the down projection's alone is 256 KB here) or its activations kept past
    # its turn would each exceed that, and the excess would add up layer after layer
    growth = [alive[i] - alive[1] for i in range(2, LAYERS)]
    assert max(growth) < layer_bytes / 4, (growth, layer_bytes)

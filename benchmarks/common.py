"""What every case process shares, ours and the peers' alike: text, token windows, model
loading, perplexity and phase timing.

This module runs in each side's own virtual environment, so it imports only torch,
transformers and the standard library; it never imports ``compressor`` (absent from a peer's
venv). Perplexity is ``compressor.utils.eval.perplexity`` loaded from its source file, so both
sides are scored by the very same function.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EVAL_SOURCE = ROOT / "src" / "compressor" / "utils" / "eval.py"


# ------------------------------------------------------------------ memory and time
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, as the OS reports it (VmHWM)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class NotAvailable(Exception):
    """This side cannot run this task: an API not landed yet, or a technique the peer lacks."""


def reset_peak_rss() -> bool:
    """Restart the process's high-water mark (VmHWM) at its current RSS (Linux: writing 5 to
    ``/proc/self/clear_refs``); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Phases:
    """Wall time and CPU time of named phases of one case process, and the process's peak RSS
    (VmHWM) at the end of each: the peak after the save phase is the job's own, before any
    evaluation.

    :param own_peaks: also record each phase's own peak (``phase_peak_rss_mb``: the high-water
        mark restarted as the phase begins), to tell which phase holds the most memory; the
        process's peak is then the largest of them (``process_peak_mb``)
    """

    def __init__(self, own_peaks: bool = False) -> None:
        self.records: dict[str, dict[str, float]] = {}
        self.own_peaks = own_peaks
        self._peak_before = 0.0  # the process's peak before the last restart

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.own_peaks:
            self._peak_before = self.process_peak_mb()
            self.own_peaks = reset_peak_rss()
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.records[name] = {
            "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu,
            "peak_rss_mb": max(peak_rss_mb(), self._peak_before),
        }
        if self.own_peaks:
            self.records[name]["phase_peak_rss_mb"] = peak_rss_mb()

    def process_peak_mb(self) -> float:
        """The process's peak RSS so far, across the restarts of ``own_peaks``."""
        return max(peak_rss_mb(), self._peak_before)


# ------------------------------------------------------------------ text and tokens
def read_text(path: str | Path, collapse_blank_lines: bool = True) -> str:
    text = Path(path).read_text(encoding="utf-8")
    if collapse_blank_lines:
        text = re.sub(r"\n\s*\n+", "\n", text)
    return text


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def calibration_ids(tokenizer: Any, spec: dict[str, Any]) -> list[list[int]]:
    """``samples`` rows of ``seq_len`` consecutive tokens from the start of ``spec['file']``
    (from character ``char_start``)."""
    samples, seq_len = int(spec["samples"]), int(spec["seq_len"])
    text = read_text(spec["file"], spec.get("collapse_blank_lines", True))
    start = int(spec.get("char_start", 0))
    # enough characters for the tokens wanted (at least one character per token), read once
    ids = encode(tokenizer, text[start : start + samples * seq_len * 8])
    if len(ids) < samples * seq_len:
        raise ValueError(
            f"calibration text {spec['file']} gives {len(ids)} tokens, "
            f"fewer than samples*seq_len = {samples * seq_len}"
        )
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(samples)]


def eval_ids(tokenizer: Any, spec: dict[str, Any]) -> Any:
    """1-D token ids of the held-out slice ``[char_start, char_end)`` of ``spec['file']``."""
    import torch

    text = read_text(spec["file"], spec.get("collapse_blank_lines", True))
    text = text[int(spec.get("char_start", 0)) : spec.get("char_end")]
    return torch.tensor(encode(tokenizer, text), dtype=torch.long)


def load_perplexity() -> Any:
    """``compressor.utils.eval.perplexity``, loaded from its file (works in any venv)."""
    spec = importlib.util.spec_from_file_location("_bench_eval", EVAL_SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.perplexity


def evaluate(model: Any, tokenizer: Any, spec: dict[str, Any] | None) -> float | None:
    """Perplexity over fixed windows, or None when the case asks for no evaluation."""
    if not spec:
        return None
    ids = eval_ids(tokenizer, spec)
    return float(
        load_perplexity()(
            model,
            ids,
            window=int(spec["window"]),
            max_windows=spec.get("max_windows"),
            batch_size=int(spec.get("batch_size", 4)),
            progress=False,
        )
    )


# ------------------------------------------------------------------ models and files
def load_model(
    path: str | Path, offload_folder: str | Path | None = None, dtype: str = "float32"
) -> tuple[Any, Any]:
    """The causal LM (fp32 unless ``dtype`` says otherwise) and its tokenizer from a local
    directory.

    :param offload_folder: load the decoder layers offloaded to disk there (accelerate's
        ``device_map`` / ``offload_folder``), the rest in memory, as for a model larger than
        memory
    :param dtype: the torch dtype to load in (``bfloat16`` for the FP4 / MX formats)
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if offload_folder is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            device_map=layers_on_disk_map(path),
            offload_folder=str(offload_folder),
        )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def layers_on_disk_map(path: str | Path) -> dict[str, str]:
    """accelerate device map of a Llama-family checkpoint: decoder layers on disk, the rest
    (embeddings, final norm, rotary embedding, head) in CPU memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    device_map = {}
    for name, _child in skeleton.named_children():
        if name != "model":
            device_map[name] = "cpu"
    for name, _child in skeleton.model.named_children():
        if name != "layers":
            device_map[f"model.{name}"] = "cpu"
    for index in range(len(skeleton.model.layers)):
        device_map[f"model.layers.{index}"] = "disk"
    return device_map


def dir_size_mb(path: str | Path) -> float:
    """Bytes of the weight files of a saved checkpoint (safetensors / bin), in MiB."""
    files = [p for p in Path(path).rglob("*") if p.suffix in {".safetensors", ".bin", ".pt"}]
    return sum(p.stat().st_size for p in files) / 2**20


def calibration_dataset(rows: list[list[int]]) -> Any:
    """A ``datasets.Dataset`` of pre-tokenized rows (``input_ids`` and ``attention_mask``)."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=float))


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def log(message: str) -> None:
    """Case processes talk to stderr only; their stdout is left to the libraries they run."""
    print(f"[case] {message}", file=sys.stderr, flush=True)


def two_of_four_after_reload(output_dir: str | Path) -> float:
    """Fraction of the groups of 4 consecutive input weights with at most 2 non-zeros, over
    the decoder layers' Linears of the checkpoint in ``output_dir`` reloaded by transformers
    (quantized weights dequantized): whether 2:4 survived quantization, saving and reload."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        output_dir, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    kept = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            groups = (module.weight.detach().reshape(-1, 4) != 0).sum(dim=1)
            kept += int((groups <= 2).sum())
            total += groups.numel()
    return kept / total


def moe_metrics(model: Any, model_path: str | Path) -> dict[str, Any]:
    """For a mixture-of-experts model after compression: how many expert matrices carry a
    quantization scheme (out of experts x 3 per MoE layer), and whether every router weight
    still equals the checkpoint's (the routing left exact). Empty for other models."""
    import torch
    from safetensors.torch import load_file

    config = model.config
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if not experts:
        return {}
    quantized = sum(
        1
        for name, module in model.named_modules()
        if ".experts." in name
        and isinstance(module, torch.nn.Linear)
        and getattr(module, "quantization_scheme", None) is not None
    )
    original = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        original.update(load_file(str(file)))
    params = dict(model.named_parameters())
    routers = [name for name in original if name.endswith("mlp.gate.weight")]
    exact = bool(routers) and all(
        name in params and torch.equal(params[name].detach().cpu(), original[name])
        for name in routers
    )
    total = experts * 3 * config.num_hidden_layers
    return {"experts_quantized": f"{quantized}/{total}", "router_exact": exact}

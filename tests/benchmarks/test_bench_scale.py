"""The scale benchmark's own arithmetic: per-phase peaks and the memory model's bytes.

No test here asserts a time or a measured peak of a real run: only that the figures the
table reports are what they say."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import Phases, reset_peak_rss  # noqa: E402

from benchmarks import scale  # noqa: E402


def test_each_phase_records_its_own_peak_and_the_process_peak_spans_them():
    if not reset_peak_rss():
        pytest.skip("this kernel cannot restart the high-water mark (/proc/self/clear_refs)")
    phases = Phases(own_peaks=True)
    with phases("big"):
        ballast = torch.ones(300 << 18)  # 300 MB, touched
        del ballast
    with phases("small"):
        pass
    big, small = phases.records["big"], phases.records["small"]
    # the small phase's own peak does not include the big phase's ballast...
    assert big["phase_peak_rss_mb"] - small["phase_peak_rss_mb"] > 200
    # ...while the process's peak, after it, still does
    assert small["peak_rss_mb"] >= big["phase_peak_rss_mb"]
    assert phases.process_peak_mb() >= big["phase_peak_rss_mb"]


def test_the_memory_model_counts_one_layer_the_embeddings_and_its_hessians(tmp_path):
    from transformers import LlamaConfig

    hidden, mlp, vocab, layers = 256, 1024, 512, 3
    LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=1, vocab_size=vocab,
                tie_word_embeddings=False).save_pretrained(tmp_path)  # fmt: skip
    shape = scale.layout(tmp_path, samples=4, seq_len=128)
    kv = hidden // 4
    layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp + 2 * hidden  # + 2 norms
    mb = 2**20
    assert shape["layers"] == layers
    assert shape["largest_layer_mb"] == pytest.approx(layer * 4 / mb)
    assert shape["embeddings_mb"] == pytest.approx((2 * vocab * hidden + hidden) * 4 / mb)
    assert shape["model_mb"] == pytest.approx(shape["params"] * 4 / mb)
    assert shape["params"] == layers * layer + 2 * vocab * hidden + hidden
    # q/k/v share one Hessian, gate/up another: hidden^2 three times (with o) and mlp^2 once
    assert shape["hessians_mb"] == pytest.approx((3 * hidden**2 + mlp**2) * 4 / mb)
    assert shape["activations_mb"] == pytest.approx(2 * 4 * 128 * hidden * 4 / mb)
    assert scale.layer_terms_mb(shape) == pytest.approx(sum(shape[k] for k in (
        "largest_layer_mb", "embeddings_mb", "activations_mb", "hessians_mb")))  # fmt: skip


def test_the_fixed_overhead_comes_from_the_smallest_model_and_each_side_has_its_own():
    def run(side, peak):
        return {"side": side, "row": {"status": "ok", "peak_rss_mb": peak}}

    small = {
        "largest_layer_mb": 4.0,
        "embeddings_mb": 1.0,
        "activations_mb": 0.5,
        "hessians_mb": 4.5,
        "params": 1,
    }  # layer terms: 10 MB
    big = dict(small, largest_layer_mb=204.0, params=2)  # 210 MB
    report = {"models": [
        {"model": "big", "shape": big, "runs": [run("ours", 900.0), run("peer", 700.0)]},
        {"model": "small", "shape": small, "runs": [run("ours", 510.0), run("peer", 610.0)]},
    ]}  # fmt: skip
    scale.apply_budgets(report)
    assert report["fixed_overhead_mb"] == {"ours": 500.0, "peer": 600.0}
    ours_big, peer_big = (r["row"] for r in report["models"][0]["runs"])
    assert ours_big["budget_mb"] == 710.0 and peer_big["budget_mb"] == 810.0
    assert ours_big["peak_over_budget"] == pytest.approx(900 / 710)


def test_the_table_gives_the_compress_phase_cpu_seconds_per_layer():
    shape = {"params": 1e6, "model_mb": 4.0, "largest_layer_mb": 1.0, "embeddings_mb": 1.0,
             "activations_mb": 0.5, "hessians_mb": 0.5, "layers": 16}  # fmt: skip
    row = {"status": "ok", "process_wall_s": 90.0, "process_cpu_s": 60.0,
           "phase_wall_s": {"load": 2.0, "compress": 80.0, "save": 1.0},
           "phase_cpu_s": {"load": 1.0, "compress": 40.0, "save": 0.5},
           "compress_s_per_layer": 5.0, "phase_peak_rss_mb": {"compress": 600.0},
           "peak_rss_mb": 600.0, "peak_over_model": 150.0, "load_avg_before": [3.0, 3.0, 3.0]}  # fmt: skip
    report = {"date": "d", "about": "", "command": "c", "calibration": "x", "threads": 2,
              "machine": "m", "models": [{"model": "m16", "shape": shape,
                                          "runs": [{"side": "ours", "row": row}]}]}  # fmt: skip
    scale.apply_budgets(report)
    line = next(x for x in scale.markdown(report).splitlines() if x.startswith("| m16 | ours"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    header = next(x for x in scale.markdown(report).splitlines() if "CPU s / layer" in x)
    column = [c.strip() for c in header.split("|")[1:-1]].index("CPU s / layer")
    assert cells[column] == "2.5"  # 40 CPU-s over 16 layers, not the 5 s of wall per layer

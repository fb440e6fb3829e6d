"""The suites: which cases each runs at each size.

Sizes: ``smoke`` (a tiny synthetic model, for the harness's own test), ``quick`` (the default:
minutes on 2 cores) and ``full`` (every model, more repeats). Recipes live in
``benchmarks/recipes/ours`` (our format) and ``benchmarks/recipes/<peer>`` (the peer's own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.harness import Case
from benchmarks.models import WIKITEXT_CALIBRATION_AWAY, WIKITEXT_RAW_FROM_START

SIZES = ("smoke", "quick", "full")
QUANT = "compressor.modifiers.QuantizationModifier"
GPTQ = "compressor.modifiers.GPTQModifier"
AWQ = "compressor.modifiers.AWQModifier"
SMOOTHQUANT = "compressor.modifiers.SmoothQuantModifier"
ONESHOT = "compressor.oneshot"
SAVE = "compressor.save_compressed"


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    cases: Callable[[str], list[Case]]


def _w4a16(model: str) -> str:
    """The W4A16 recipe a model's widths allow: groups of 128 where every targeted input width
    is a multiple of 128 (synthetic Llamas), 64 for SmolLM2 (hidden 576), per channel for
    stories260K (widths 64 and 172 share no useful group size)."""
    return {"stories260K": "quant_w4a16_channel", "smollm2-135m": "quant_w4a16_g64"}.get(
        model, "quant_w4a16"
    )


def _both(recipe: str | None) -> dict[str, str | None]:
    return {"ours": f"ours/{recipe}.yaml", "llmcompressor": f"llmcompressor/{recipe}.yaml"}


def _both_named(ours: str, peer: str) -> dict[str, str | None]:
    return {"ours": f"ours/{ours}.yaml", "llmcompressor": f"llmcompressor/{peer}.yaml"}


def _fp(suite: str, model: str, ev: tuple[int, int | None], eval_text: dict | None = None) -> Case:
    return Case(suite, "FP", model, "eval", {"ours": None}, eval=ev, key_phase="eval",
                eval_text=eval_text or {})  # fmt: skip


FLOOR_CASE = "floor: torch + transformers import and load only"


def _whole_process(suite: str, size: str, rtn: bool) -> list[Case]:
    """Issue 27's cases: what a user waits for, each side in a fresh process timed from the
    interpreter's start to its exit (runners/whole.py): import, load, W4A16 round-to-nearest
    (``rtn``) or GPTQ, save; the library's import alone; and the floor under both sides
    (torch and transformers imported and the same load, without either library). The goal:
    the whole process at least 2x faster than llm-compressor's, with no higher peak."""
    # llama-400m (1.6 GB in fp32, saved to disk): a model whose load, compress and save weigh
    # more than the imports both sides pay
    models = {"smoke": ["llama-tiny"], "quick": ["llama-l" if rtn else "llama-m"]}.get(
        size, ["llama-m", "llama-l", "llama-400m", "smollm2-135m"]
    )
    calib = None if rtn else {"smoke": (4, 32), "quick": (32, 256)}.get(size, (64, 256))
    repeats = {"smoke": 1, "quick": 2, "full": 3}[size]
    need = (ONESHOT, SAVE, QUANT if rtn else GPTQ)
    cases = [
        Case(suite, "import alone", "stories260K" if size != "smoke" else "llama-tiny",
             "import", {"ours": None, "llmcompressor": None}, repeats=repeats + 1,
             key_phase="import"),
    ]  # fmt: skip
    for model in models:
        if rtn:
            name, recipe = "RTN W4A16 whole process", _w4a16(model)
        else:
            name = "GPTQ W4A16 whole process"
            recipe = {"smollm2-135m": "gptq_w4a16_g64"}.get(model, "gptq_w4a16")
        cases.append(
            Case(suite, name, model, "whole", _both(recipe), calibration=calib, requires=need,
                 save=True, repeats=repeats)
        )  # fmt: skip
        # the floor under both sides: torch + transformers imported, the same load, no library
        cases.append(
            Case(suite, FLOOR_CASE, model, "floor", {"ours": None}, calibration=calib,
                 repeats=repeats, key_phase="load")
        )  # fmt: skip
    return cases


# ------------------------------------------------------------------ quant (issue 3)
def quant_cases(size: str) -> list[Case]:
    models = {"smoke": ["llama-tiny"], "quick": ["stories260K"]}.get(
        size, ["stories260K", "smollm2-135m"]
    )
    ev = (64, 2) if size == "smoke" else (128, 16) if size == "quick" else (512, 32)
    repeats = {"smoke": 1, "quick": 2, "full": 3}[size]
    cases = []
    for model in models:
        cases.append(_fp("quant", model, ev))
        for name, recipe in (
            ("W4A16", _w4a16(model)),
            ("W8A8", "quant_w8a8"),
            ("FP8_DYNAMIC", "quant_fp8_dynamic"),
        ):
            cases.append(
                Case(
                    "quant",
                    name,
                    model,
                    "oneshot",
                    _both(recipe),
                    eval=ev,
                    requires=(ONESHOT, SAVE, QUANT),
                    save=True,
                    repeats=repeats,
                )
            )
        cases.extend(_fp4_and_kv_cache_cases(model, ev, repeats))
    smollm2 = _awq_smoothquant_smollm2_cases() if size == "full" else []
    return cases + _awq_smoothquant_cases(size) + smollm2 + _whole_process("quant", size, rtn=True)


def _fp4_and_kv_cache_cases(model: str, ev: tuple[int, int | None], repeats: int) -> list[Case]:
    """Issue 20's schemes: NVFP4A16 and MXFP4A16 (which need a bfloat16 model: their
    checkpoints decompress to bfloat16; compared with the model's own bfloat16 perplexity),
    and an FP8 key/value cache alone (static per-tensor scales calibrated on issue 20's 32x128
    rows)."""
    bf16 = {"dtype": "bfloat16"}
    suffix = "_stories" if model == "stories260K" else ""  # its down_proj is 172 wide
    cases = [
        Case("quant", "FP bf16", model, "eval", {"ours": None}, eval=ev, params=bf16,
             key_phase="eval"),
    ]  # fmt: skip
    for name, recipe in (("NVFP4A16", "quant_nvfp4a16"), ("MXFP4A16", "quant_mxfp4a16")):
        cases.append(
            Case("quant", name, model, "oneshot", _both(recipe + suffix), eval=ev,
                 requires=(ONESHOT, SAVE, QUANT), params=bf16, save=True, repeats=repeats)
        )  # fmt: skip
    cases.append(
        Case("quant", "FP8 kv cache", model, "oneshot", _both("quant_fp8_kv_cache"),
             calibration=(32, 128), eval=ev, requires=(ONESHOT, SAVE, QUANT), save=True,
             repeats=repeats)
    )  # fmt: skip
    return cases


# ------------------------------------------------------------------ AWQ and SmoothQuant (issue 20)
#: issue 20's rows: (case name, recipe, the modifier our side needs)
AWQ_SMOOTHQUANT_ROWS = (
    ("W4 asym channel RTN", "quant_w4_asym_channel", QUANT),
    ("W4 asym channel GPTQ", "gptq_w4_asym_channel", GPTQ),
    ("W4 asym channel AWQ", "awq_w4_asym_channel", AWQ),
    ("W4 asym channel AWQ+GPTQ", "awq_gptq_w4_asym_channel", AWQ),
    ("W8A8 static", "quant_w8a8_static", QUANT),
    ("SmoothQuant 0.8 + W8A8 static", "smoothquant_w8a8_static", SMOOTHQUANT),
    # llm-compressor's SmoothQuant W8A8 recipes quantize with GPTQ
    ("SmoothQuant 0.8 + GPTQ W8A8 static", "smoothquant_gptq_w8a8_static", SMOOTHQUANT),
)


def _awq_smoothquant_cases(size: str) -> list[Case]:
    """Issue 20's table on stories260K: int4 asymmetric per-channel weights by rounding, GPTQ,
    AWQ and AWQ then GPTQ; int8 static per-tensor W8A8 with and without SmoothQuant 0.8. 32 rows
    of 128 calibration tokens from the start of the text, 16 windows of 128 scored from
    character 500k. llm-compressor 0.14's AWQ needs an accelerator: its rows say so."""
    model = "llama-tiny" if size == "smoke" else "stories260K"
    calib = (4, 32) if size == "smoke" else (32, 128)
    ev = (64, 2) if size == "smoke" else (128, 16)
    repeats = {"smoke": 1, "quick": 1, "full": 2}[size]
    cases = []
    for name, recipe, modifier in AWQ_SMOOTHQUANT_ROWS:
        cases.append(
            Case(
                "quant",
                name,
                model,
                "oneshot",
                _both(recipe),
                calibration=calib,
                eval=ev,
                requires=(ONESHOT, modifier),
                repeats=repeats,
            )
        )
    return cases


def _awq_smoothquant_smollm2_cases() -> list[Case]:
    """Issue 20's table on SmolLM2-135M, with the same recipes as stories260K and the prune
    suite's SmolLM2 protocol (16 rows of 512 calibration tokens from the start of WikiText-2's
    test text, 8 evaluation windows of 512 from its later, disjoint slice), once per side: small
    enough for 2 shared cores. Its weights lie on a Q4_1 grid already, so the W4 rows compare
    methods with each other, not with the full-precision row."""
    model, calib, ev = "smollm2-135m", (16, 512), (512, 8)
    # named apart from the suite's other SmolLM2 FP row (32 windows)
    cases = [Case("quant", "FP 8 windows", model, "eval", {"ours": None}, eval=ev,
                  key_phase="eval")]  # fmt: skip
    for name, recipe, modifier in AWQ_SMOOTHQUANT_ROWS:
        cases.append(Case("quant", name, model, "oneshot", _both(recipe), calibration=calib,
                          eval=ev, requires=(ONESHOT, modifier)))  # fmt: skip
    return cases


# ------------------------------------------------------------------ gptq (issue 9)
def gptq_cases(size: str) -> list[Case]:
    # stories260K: the real (trained) model, so the perplexities compare GPTQ's quality too
    models = {"smoke": ["llama-tiny"], "quick": ["stories260K", "llama-s", "llama-m"]}.get(
        size, ["stories260K", "smollm2-135m", "llama-m", "llama-l"]
    )
    calib = {"smoke": (4, 32), "quick": (32, 256), "full": (64, 256)}[size]
    ev = (64, 2) if size == "smoke" else (256, 16)
    repeats = {"smoke": 1, "quick": 2, "full": 3}[size]
    cases = []
    for model in models:
        w4 = _w4a16(model)
        gptq = {"smollm2-135m": "gptq_w4a16_g64", "stories260K": "gptq_w4a16_channel"}.get(
            model, "gptq_w4a16"
        )
        cases.append(_fp("gptq", model, ev))
        cases.append(
            Case(
                "gptq",
                "RTN W4A16",
                model,
                "oneshot",
                _both(w4),
                eval=ev,
                requires=(ONESHOT, QUANT),
                repeats=repeats,
            )  # fmt: skip
        )
        # on disk: the model loaded with its decoder layers offloaded (larger than memory)
        on_disk = model == {"quick": "llama-m", "full": "smollm2-135m"}.get(size)
        for name, params in [("GPTQ W4A16", {})] + on_disk * [
            ("GPTQ W4A16 layers on disk", {"layers_on_disk": True})
        ]:
            cases.append(
                Case(
                    "gptq",
                    name,
                    model,
                    "oneshot",
                    _both(gptq),
                    calibration=calib,
                    eval=ev,
                    requires=(ONESHOT, "compressor.modifiers.GPTQModifier"),
                    params=params,
                    repeats=repeats,
                )  # fmt: skip
            )
    return cases + _whole_process("gptq", size, rtn=False)


# ------------------------------------------------------------------ spinquant (issue 10)
def spinquant_cases(size: str) -> list[Case]:
    model = "llama-tiny" if size == "smoke" else "stories260K"
    ev = (64, 2) if size == "smoke" else (128, 16)
    spin = "compressor.modifiers.SpinQuantModifier"
    cases = [_fp("spinquant", model, ev)]
    for name, recipe, needs in (
        ("R1R2", "spin_r1r2", (spin,)),
        ("W4A16", "spin_w4a16", (QUANT,)),
        ("R1R2 + W4A16", "spin_r1r2_w4a16", (spin, QUANT)),
        ("W4A4", "spin_w4a4", (QUANT,)),
        ("R1R2 + W4A4", "spin_r1r2_w4a4", (spin, QUANT)),
        ("R1R2R4 + W4A4", "spin_r1r2r4_w4a4", (spin, QUANT)),
    ):
        cases.append(
            Case(
                "spinquant",
                name,
                model,
                "oneshot",
                _both(recipe),
                eval=ev,
                requires=(ONESHOT, *needs),
            )  # fmt: skip
        )
    # learned rotations (issue 23): ours only, llm-compressor refuses them; 100 Cayley steps of
    # 8 rows each over 800 calibration rows of 128 tokens (each row seen once, as the paper's
    # 100 steps x 8 over 800 samples), from the start of the text, far before the scored slice
    learned_rows = (4, 32) if size == "smoke" else (800, 128)
    cases.append(
        Case(
            "spinquant",
            "R1R2 learned + W4A4",
            model,
            "oneshot",
            {"ours": "ours/spin_learned_r1r2_w4a4.yaml"},
            calibration=learned_rows,
            eval=ev,
            requires=(ONESHOT, spin, QUANT),
        )  # fmt: skip
    )
    cases.append(
        Case(
            "spinquant",
            "R1R2 learned + R4 + W4A4",
            model,
            "oneshot",
            {"ours": "ours/spin_learned_r1r2r4_w4a4.yaml"},
            calibration=learned_rows,
            eval=ev,
            requires=(ONESHOT, spin, QUANT),
        )  # fmt: skip
    )
    if size == "full":
        cases.extend(_activation_only_cases())
    return cases


def _activation_only_cases() -> list[Case]:
    """Issue 23's table: SmolLM2-135M with only the activations quantized (its weights sit on
    a Q4_1 grid that any rotation leaves), per-token dynamic int4 and int6, with no rotation,
    R1R2 and R1R2R4; the issue's protocol: the first 6 windows of 512 tokens of the raw
    WikiText-2 test split (fp32 29.04; the model's usual held-out slice gives 29.89)."""
    model, ev, spin = "smollm2-135m", (512, 6), "compressor.modifiers.SpinQuantModifier"
    text = WIKITEXT_RAW_FROM_START
    cases = [_fp("spinquant", model, ev, text)]
    for bits in (4, 6):
        for name, recipe, needs in (
            (f"A{bits}", f"spin_a{bits}", (QUANT,)),
            (f"R1R2 + A{bits}", f"spin_r1r2_a{bits}", (spin, QUANT)),
            (f"R1R2R4 + A{bits}", f"spin_r1r2r4_a{bits}", (spin, QUANT)),
        ):
            cases.append(Case("spinquant", name, model, "oneshot", _both(recipe), eval=ev,
                              eval_text=text, requires=(ONESHOT, *needs)))  # fmt: skip
    # learned R1R2 with R4 in the loop (ours only): 12 steps of one calibration row of 256
    # tokens, from WikiText-2 away from the scored windows
    cases.append(Case("spinquant", "R1R2 learned + R4 + A4", model, "oneshot",
                      {"ours": "ours/spin_learned_r1r2r4_a4.yaml"}, calibration=(12, 256),
                      calibration_text=WIKITEXT_CALIBRATION_AWAY, eval=ev, eval_text=text,
                      requires=(ONESHOT, spin, QUANT)))  # fmt: skip
    # learned on the ranges of the rotated inputs (learn_loss: input_range), ours only: the
    # inputs of 8 calibration rows of 512 tokens, away from the scored windows, 200 steps
    for bits in (4, 6):
        cases.append(Case("spinquant", f"R1R2 learned on input ranges + R4 + A{bits}", model,
                          "oneshot", {"ours": f"ours/spin_ranges_r1r2r4_a{bits}.yaml"},
                          calibration=(8, 512), calibration_text=WIKITEXT_CALIBRATION_AWAY,
                          eval=ev, eval_text=text, requires=(ONESHOT, spin, QUANT)))  # fmt: skip
    cases.append(Case("spinquant", "R1R2R4 blocks of 64 + A4", model, "oneshot",
                      _both("spin_r1r2r4_b64_a4"), eval=ev, eval_text=text,
                      requires=(ONESHOT, spin, QUANT)))  # fmt: skip
    return cases


# ------------------------------------------------------------------ prune (issue 4)
def prune_cases(size: str) -> list[Case]:
    acc_model = "llama-tiny" if size == "smoke" else "stories260K"
    lat_model = {"smoke": "llama-tiny", "quick": "llama-m"}.get(size, "llama-l")
    # issue 26's protocol: 32x128 calibration tokens, 16 evaluation windows of 128
    ev = (64, 2) if size == "smoke" else (128, 16)
    sparse = "compressor.modifiers.SparsePruningModifier"
    sgpt = "compressor.modifiers.SparseGPTModifier"
    gptq = "compressor.modifiers.GPTQModifier"
    structured = (
        "compressor.modifiers.RowPruningModifier",
        "compressor.modifiers.HeadPruningModifier",
    )
    calib = (4, 32) if size == "smoke" else (32, 128)
    iters = {"smoke": 3, "quick": 20, "full": 40}[size]
    return [
        Case("prune", "heads 50% + rows 50%, cleaned", lat_model, "latency",
             {"ours": "ours/prune_heads_rows_50.yaml"}, requires=(ONESHOT, *structured),
             params={"batch": 1, "seq_len": 128, "iters": iters}, key_phase="compress"),
        Case("prune", "rows 50%, cleaned", lat_model, "latency",
             {"ours": "ours/prune_rows_50.yaml"}, requires=(ONESHOT, structured[0]),
             params={"batch": 1, "seq_len": 128, "iters": iters}, key_phase="compress"),
        _fp("prune", acc_model, ev),
        Case("prune", "50% unstructured, magnitude", acc_model, "oneshot",
             {"ours": "ours/prune_sparse_50.yaml"}, eval=ev, requires=(ONESHOT, sparse)),
        Case("prune", "2:4, magnitude", acc_model, "oneshot",
             {"ours": "ours/prune_sparse_2of4.yaml"}, eval=ev, requires=(ONESHOT, sparse)),
        Case("prune", "50% unstructured, activation-aware", acc_model, "oneshot",
             _both_named("prune_act_50", "prune_wanda_50"), calibration=calib, eval=ev,
             requires=(ONESHOT, sparse)),
        Case("prune", "2:4, activation-aware", acc_model, "oneshot",
             _both_named("prune_act_2of4", "prune_wanda_2of4"), calibration=calib, eval=ev,
             requires=(ONESHOT, sparse)),
        Case("prune", "SparseGPT 50% unstructured", acc_model, "oneshot",
             _both("prune_sparsegpt_50"), calibration=calib, eval=ev, requires=(ONESHOT, sgpt)),
        Case("prune", "SparseGPT 2:4", acc_model, "oneshot", _both("prune_sparsegpt_2of4"),
             calibration=calib, eval=ev, requires=(ONESHOT, sgpt)),
        Case("prune", "Wanda 50% unstructured (per row)", acc_model, "oneshot",
             _both("prune_wanda_50"), calibration=calib, eval=ev,
             requires=(ONESHOT, "compressor.modifiers.WandaPruningModifier")),
        Case("prune", "SparseGPT 70% unstructured", acc_model, "oneshot",
             _both("prune_sparsegpt_70"), calibration=calib, eval=ev, requires=(ONESHOT, sgpt)),
        Case("prune", "SparseGPT OWL 50%", acc_model, "oneshot", _both("prune_sparsegpt_owl_50"),
             calibration=calib, eval=ev, requires=(ONESHOT, sgpt)),
        Case("prune", "SparseGPT OWL 70%", acc_model, "oneshot", _both("prune_sparsegpt_owl_70"),
             calibration=calib, eval=ev, requires=(ONESHOT, sgpt)),
        Case("prune", "GPTQ W4A16 alone", acc_model, "oneshot", _both("gptq_w4a16_channel"),
             calibration=calib, eval=ev, requires=(ONESHOT, gptq)),
        Case("prune", "SparseGPT 2:4 + GPTQ W4A16", acc_model, "oneshot",
             _both("prune_sparsegpt_2of4_gptq_w4a16"), calibration=calib, eval=ev,
             requires=(ONESHOT, SAVE, sgpt, gptq), save=True, params={"two_of_four": True}),
    ] + (_owl_smollm2_cases() if size == "full" else [])  # fmt: skip


def _owl_smollm2_cases() -> list[Case]:
    """Issue 26's OWL goal on the second model: SparseGPT on SmolLM2-135M at 50% and 70%,
    uniform against OWL layer sparsities; 16 rows of 512 calibration tokens from the start of
    WikiText-2's test text, 8 evaluation windows of 512 from its later, disjoint slice (small
    enough to run on 2 shared cores). OWL's lambda is this model's, chosen per sparsity on
    validation text by ``benchmarks.owl_lambda`` (the paper tunes it per model), not
    stories260K's."""
    model, calib, ev = "smollm2-135m", (16, 512), (512, 8)
    sgpt = "compressor.modifiers.SparseGPTModifier"
    cases = [_fp("prune", model, ev)]
    for name, recipe in (
        ("SparseGPT 50% unstructured", "prune_sparsegpt_50"),
        ("SparseGPT OWL 50%", "prune_sparsegpt_owl_50_smollm2"),
        ("SparseGPT 70% unstructured", "prune_sparsegpt_70"),
        ("SparseGPT OWL 70%", "prune_sparsegpt_owl_70_smollm2"),
    ):
        cases.append(Case("prune", name, model, "oneshot", _both(recipe), calibration=calib,
                          eval=ev, requires=(ONESHOT, sgpt)))  # fmt: skip
    return cases


# ------------------------------------------------------------------ layers (issue 6)
def layers_cases(size: str) -> list[Case]:
    models = {"smoke": ["llama-tiny"], "quick": ["stories260K"]}.get(
        size, ["stories260K", "smollm2-135m"]
    )
    ev = (64, 2) if size == "smoke" else (128, 32)
    calib = (4, 32) if size == "smoke" else (16, 128)
    need = (ONESHOT, "compressor.modifiers.LayerReductionModifier")
    cases = []
    for model in models:
        tag = (
            "smollm2"
            if model == "smollm2-135m"
            else "stories"
            if model == "stories260K"
            else "tiny"
        )
        cases += [
            _fp("layers", model, ev),
            Case("layers", "drop 25%: angular", model, "oneshot",
                 {"ours": f"ours/layers_angular_{tag}.yaml"}, calibration=calib, eval=ev,
                 requires=need),
            Case("layers", "drop 25%: last", model, "oneshot",
                 {"ours": f"ours/layers_last_{tag}.yaml"}, eval=ev, requires=need),
        ]  # fmt: skip
    return cases


# ------------------------------------------------------------------ train (issue 5)
def train_cases(size: str) -> list[Case]:
    model = {"smoke": "llama-tiny", "quick": "llama-s"}.get(size, "llama-m")
    params = {
        "smoke": {"batch": 2, "steps": 2, "warmup": 1},
        "quick": {"batch": 4, "steps": 12, "warmup": 2},
        "full": {"batch": 8, "steps": 30, "warmup": 3},
    }[size]
    calib = (8, 32) if size == "smoke" else (64, 128)
    rows = [
        ("W8A8 fake quant (QAT)", "train_w8a8", QUANT, "train_w8a8.json"),
        ("50% sparse masks", "train_sparse_50", "compressor.modifiers.SparsePruningModifier",
         "train_sparse_50.json"),
        ("50% MLP rows, masks", "train_rows_50", "compressor.modifiers.RowPruningModifier",
         "train_rows_50.json"),
    ]  # fmt: skip
    return [
        Case("train", name, model, "train",
             {"ours": f"ours/{ours}.yaml", "deepspeed": f"deepspeed/{ds}"},
             calibration=calib, requires=(need,), params=params, key_phase="train")
        for name, ours, need, ds in rows
    ]  # fmt: skip


# ------------------------------------------------------------------ MoE (issue 22)
def moe_cases(size: str) -> list[Case]:
    """W4A16 round-to-nearest, GPTQ and AWQ on a synthetic Qwen3-MoE (8 experts, top-2),
    against llm-compressor with the same recipes; each side reports how many expert matrices
    it quantized and whether the routers are unchanged (AWQ folds its scales into the routers:
    their weights change, their routing does not)."""
    model = "moe-tiny" if size == "smoke" else "moe-s"
    calib = (4, 32) if size == "smoke" else (16, 128)
    ev = (64, 2) if size == "smoke" else (128, 16)
    repeats = {"smoke": 1, "quick": 1, "full": 2}[size]
    return [
        _fp("moe", model, ev),
        Case("moe", "W4A16 RTN", model, "oneshot", _both("quant_w4a16"), eval=ev,
             requires=(ONESHOT, SAVE, QUANT), save=True, repeats=repeats),
        Case("moe", "W4A16 GPTQ", model, "oneshot", _both("gptq_w4a16"), calibration=calib,
             eval=ev, requires=(ONESHOT, SAVE, GPTQ), save=True, repeats=repeats),
        Case("moe", "W4A16 AWQ", model, "oneshot", _both("awq_w4a16"), calibration=calib,
             eval=ev, requires=(ONESHOT, SAVE, AWQ), save=True, repeats=repeats),
    ]  # fmt: skip


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("quant", "Post-training quantization on the real models: oneshot time, peak "
              "memory, checkpoint size and perplexity before (FP) and after, against "
              "llm-compressor with the same scheme. W4A16 uses groups of 128 where the widths "
              "allow; stories260K (widths 64, 172) uses one scale per channel, SmolLM2 "
              "(width 576) groups of 64.", quant_cases),
        Suite("gptq", "W4A16 round-to-nearest and GPTQ (block 128, dampening 0.01) on the real "
              "stories260K, SmolLM2 and synthetic Llamas, against llm-compressor on the same calibration rows: "
              "wall time, peak memory, perplexity. Goal: at least 2x faster.", gptq_cases),
        Suite("spinquant", "FP, W4A16 and W4A4 (int4 per-channel weights, int4 dynamic "
              "per-token activations), each with and without R1+R2 rotations (and R1+R2+R4 "
              "for W4A4; learned R1+R2 with and without R4, ours only), on stories260K; at size full also SmolLM2-135M with only its "
              "activations quantized (per-token dynamic int4 and int6) under no rotation, "
              "R1R2 and R1R2R4 (and learned R1R2 with R4, ours only), scored as issue 23 "
              "measured it: the first 6 windows of 512 tokens of the raw WikiText-2 test split; "
              "perplexity against llm-compressor's SpinQuantModifier.",
              spinquant_cases),
        Suite("prune", "Forward latency of the cleaned model (50% of heads and 50% of MLP rows "
              "removed) against the dense one, and perplexity of stories260K at 50% "
              "unstructured and 2:4 sparsity: by magnitude (ours alone: llm-compressor's "
              "magnitude pruning is training-only and prunes nothing in oneshot) and "
              "activation-aware (|W| x input norm, ranked per layer), against llm-compressor's "
              "Wanda; SparseGPT (50%, 2:4) and Wanda (per row) against llm-compressor's; and "
              "SparseGPT 2:4 then GPTQ W4A16 (groups still 2:4 after save and reload, "
              "perplexity against 2:4 alone and GPTQ W4A16 alone). Calibration: 32x128 tokens "
              "from the start of tinystories_val.txt; evaluation: 16 windows of 128.",
              prune_cases),
        Suite("layers", "Perplexity after dropping 25% of the decoder layers chosen by angular "
              "distance against dropping the last 25% (no peer offers this).", layers_cases),
        Suite("train", "Training step time with each training-aware modifier active against a "
              "plain step of the same model (ratio of medians, steps alternating in one "
              "process), beside DeepSpeed compression's ratio for the same technique. Goals: "
              "weight+activation fake quantization <= 1.3x, masks <= 1.1x.", train_cases),
        Suite("moe", "Mixture of experts: W4A16 round-to-nearest, GPTQ and AWQ on a synthetic "
              "Qwen3-MoE (8 experts routed top-2, fused 3-D expert weights as transformers 5 "
              "stores them), against llm-compressor on the same calibration rows: time, peak "
              "memory, perplexity, the expert matrices quantized (of experts x 3 per layer) and "
              "whether every router weight is unchanged (AWQ scales the routers' weights, "
              "which keeps their routing).", moe_cases),
    )
}  # fmt: skip

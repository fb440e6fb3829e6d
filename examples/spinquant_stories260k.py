"""SpinQuant (R1+R2) before quantization on stories260K: the perplexity table of issue 10, and
the figures that explain it (what the rotation does to each quantized tensor's int4 error).

Protocol (the issue's): blank lines collapsed; 32 x 128 calibration tokens from the start of
tinystories_val.txt; evaluation on 16 windows of 128 tokens from characters 500k-900k.

    PYTHONPATH=src python examples/spinquant_stories260k.py [--types hadamard,random-hadamard]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from loguru import logger
from transformers import AutoTokenizer, LlamaForCausalLM

from compressor import create_session
from compressor.modifiers import QuantizationModifier, SpinQuantModifier
from compressor.utils.eval import perplexity

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODEL = SHARED / "models" / "stories260K"
TEXT = SHARED / "data" / "tinystories_val.txt"
W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}
A4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
SCHEMES = {"FP": None, "W4A16": {"weights": W4}, "W4A4": {"weights": W4, "input_activations": A4}}
ROLES = ("q_proj", "o_proj", "up_proj", "down_proj")


def data() -> tuple[list[torch.Tensor], torch.Tensor]:
    text = re.sub(r"\n\s*\n+", "\n", TEXT.read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    calib = torch.tensor(tokenizer(text[:100_000])["input_ids"][: 32 * 128]).view(32, 128)
    evaluation = torch.tensor(tokenizer(text[500_000:900_000])["input_ids"])
    return list(calib.split(8)), evaluation


def compress(transform_type: str | None, scheme: str, calib: list[torch.Tensor], **quant):
    """stories260K after an optional SpinQuant and an optional quantization, in one session."""
    model = LlamaForCausalLM.from_pretrained(MODEL).eval()
    recipe = []
    if transform_type:
        recipe.append(SpinQuantModifier(transform_type=transform_type))
    if SCHEMES[scheme]:
        groups = {"g": {"targets": quant.get("targets", ["Linear"]), **SCHEMES[scheme]}}
        recipe.append(QuantizationModifier(ignore=["lm_head"], config_groups=groups))
    with create_session() as session:
        session.initialize(model, recipe)
        session.calibration_epoch_start()
        with torch.no_grad():
            for batch in calib:
                model(input_ids=batch)
        session.calibration_epoch_end()
        session.finalize()
    return model


def int4_error(x: torch.Tensor) -> float:
    """Relative error of symmetric int4 round-to-nearest along the last dim (per token for
    activations, per output channel for weights)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 7.5
    q = torch.clamp(torch.round(x / scale), -8, 7) * scale
    return ((q - x).norm() / x.norm()).item()


def tensor_figures(model: LlamaForCausalLM, calib: list[torch.Tensor]) -> dict[str, tuple]:
    """Per role, over all layers: int4 error of the inputs (per token) and of the weights (per
    channel), and the inputs' mean peak-to-RMS ratio (max|x| / rms(x), per token)."""
    inputs: dict[str, list[torch.Tensor]] = {r: [] for r in ROLES}
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, role=role: inputs[role].append(args[0].flatten(0, 1))
        )
        for name, module in model.named_modules()
        for role in ROLES
        if name.endswith(role)
    ]
    with torch.no_grad():
        model(input_ids=calib[0])
    for handle in handles:
        handle.remove()
    figures = {}
    for role in ROLES:
        x = torch.cat(inputs[role])
        peak = (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean().item()
        weights = [m.weight for n, m in model.named_modules() if n.endswith(role)]
        w_err = sum(int4_error(w.detach()) for w in weights) / len(weights)
        figures[role] = (int4_error(x), w_err, peak)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="hadamard,random-hadamard,random-matrix")
    args = parser.parse_args()
    logger.remove()
    calib, evaluation = data()

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, evaluation, window=128, max_windows=16, progress=False)

    rotations = [None, *args.types.split(",")]
    print("| rotation | FP | W4A16 | W4A4 | W4A4, down_proj inputs in 16 bit |")
    print("|---|---|---|---|---|")
    for rotation in rotations:
        row = [ppl(compress(rotation, s, calib)) for s in SCHEMES]
        keep = ["re:.*(q|k|v|o|gate|up)_proj$"]  # down_proj: int4 weights only
        model = compress(rotation, "W4A4", calib, targets=keep)
        row.append(ppl(_down_proj_weights_only(model, rotation, calib)))
        cells = " | ".join(f"{v:.3f}" for v in row)
        print(f"| {rotation or 'none'} | {cells} |", flush=True)

    print("\nint4 relative error of each quantized tensor (mean over layers), and the inputs'")
    print("peak-to-RMS ratio; 'fused' = norm scales folded into the linears, no rotation\n")
    print("| model | tensor | input int4 error | weight int4 error | input peak/RMS |")
    print("|---|---|---|---|---|")
    variants = {"original": None, "fused": "fused", **{r: r for r in rotations[1:]}}
    for label, variant in variants.items():
        model = LlamaForCausalLM.from_pretrained(MODEL).eval()
        if variant == "fused":
            spin = SpinQuantModifier(transform_config={"config_groups": {}})
        elif variant:
            spin = SpinQuantModifier(transform_type=variant)
        if variant:
            with create_session() as session:
                session.initialize(model, [spin])
                session.calibration_epoch_start()
                session.finalize()
        for role, (x_err, w_err, peak) in tensor_figures(model, calib).items():
            print(f"| {label} | {role} | {x_err:.4f} | {w_err:.4f} | {peak:.2f} |", flush=True)


def _down_proj_weights_only(model, rotation, calib):
    """Add int4 per-channel weights (no activation quantization) on down_proj."""
    with create_session() as session:
        groups = {"g": {"targets": ["re:.*down_proj$"], "weights": W4}}
        session.initialize(model, [QuantizationModifier(config_groups=groups)])
        session.calibration_epoch_start()
        session.calibration_epoch_end()
        session.finalize()
    return model


if __name__ == "__main__":
    main()

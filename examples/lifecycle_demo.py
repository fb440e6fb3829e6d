"""A plain training loop driven by a recipe: each modifier starts and stops on schedule.

Runs on the real stories260K model in ../shared when present, else on a tiny Llama built
from a config. Usage: python examples/lifecycle_demo.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from compressor import CompressionSession, Modifier, Recipe
from compressor.core import Event, State

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@Modifier.register()
class FreezeEmbeddingsModifier(Modifier):
    """Freezes the input embeddings while active (a small, real modifier for the demo)."""

    def on_start(self, state: State, event: Event) -> None:
        state.model.get_input_embeddings().weight.requires_grad_(False)
        print(f"  step {event.global_step}: embeddings frozen")

    def on_end(self, state: State, event: Event) -> None:
        state.model.get_input_embeddings().weight.requires_grad_(True)
        print(f"  step {event.global_step}: embeddings trainable again")


RECIPE = """
finetune_stage:
  freeze_modifiers:
    FreezeEmbeddingsModifier: {start: 2, end: 6}
"""


def load():
    path = SHARED / "models" / "stories260K"
    if (path / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(path)
        text = (SHARED / "data" / "tinystories_val.txt").read_text()[:20000]
        ids = tok(text, return_tensors="pt").input_ids[0]
        return LlamaForCausalLM.from_pretrained(path), ids, "stories260K"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config), torch.randint(0, 128, (4096,)), "tiny Llama"


def main() -> None:
    model, ids, name = load()
    loader = [{"input_ids": ids[i : i + 128].unsqueeze(0)} for i in range(0, 128 * 10, 128)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    session = CompressionSession()
    session.initialize(model=model, recipe=Recipe.from_yaml(RECIPE), optimizer=opt)
    print(f"training {name} for {len(loader)} steps")
    for batch in loader:
        session.batch_start(batch_data=batch)
        loss = session.loss_calculated(model(**batch, labels=batch["input_ids"]).loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        event = session.batch_end()
        print(f"  step {event.global_step}: loss {loss.item():.3f}")
    session.finalize()


if __name__ == "__main__":
    main()

"""SpinQuant then quantization in one recipe, through oneshot, saved compressed, reloaded."""

import torch
from transformers import AutoModelForCausalLM

from compressor import Recipe, oneshot
from compressor.modifiers import QuantizationModifier, SpinQuantModifier

RECIPE = """
quant_stage:
  quant_modifiers:
    SpinQuantModifier: {rotations: [r1, r2]}
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        w4a4:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: channel}
          input_activations: {num_bits: 4, type: int, symmetric: true, strategy: token,
                              dynamic: true}
"""


def test_rotated_and_quantized_model_saves_compressed_and_reloads(stories_model_path, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time there was a little girl named Lily. " * 40)
    out = tmp_path / "out"
    recipe = Recipe.from_yaml(RECIPE)
    model = oneshot(
        stories_model_path,
        recipe,
        text,
        num_calibration_samples=2,
        max_seq_length=32,
        output_dir=out,
    )
    assert [type(m) for m in recipe.modifiers] == [SpinQuantModifier, QuantizationModifier]
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    saved = (out / "config.json").read_text()
    assert '"quantization_status": "compressed"' in saved and '"format": "int-quantized"' in saved
    assert not reloaded.config.tie_word_embeddings
    # the rotation ran before quantization: norms were fused (unit scales), head untied
    layer = reloaded.model.layers[0]
    assert torch.all(layer.input_layernorm.weight == 1)
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    assert layer.self_attn.q_proj.quantization_scheme.input_activations.num_bits == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-5)
    assert Recipe.from_file(out / "recipe.yaml") == recipe

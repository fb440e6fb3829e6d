import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from compressor.utils.eval import perplexity, token_windows


def test_token_windows_are_fixed_and_complete():
    ids = torch.arange(1000)
    windows = token_windows(ids, 256)
    assert len(windows) == 3 and all(w.numel() == 256 for w in windows)
    assert len(token_windows(ids, 256, max_windows=2)) == 2
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(torch.arange(10), 256)


def test_perplexity_of_the_real_model(stories_model_path, tinystories_text):
    model = LlamaForCausalLM.from_pretrained(stories_model_path)
    tok = AutoTokenizer.from_pretrained(stories_model_path)
    text = "\n".join(line for line in tinystories_text[:60000].splitlines() if line.strip())
    ids = tok(text, return_tensors="pt").input_ids[0]
    ppl = perplexity(model, ids, window=512, max_windows=8, progress=False)
    # ../shared/README.md reports 3.7 over the first part of the file
    assert 3.0 < ppl < 4.5
    # a model with its weights scrambled is far worse
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.copy_(torch.randn_like(p) * p.std())
    assert perplexity(model, ids, window=512, max_windows=8, progress=False) > 2 * ppl

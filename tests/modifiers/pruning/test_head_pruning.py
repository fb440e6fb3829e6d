import pytest
import torch
from pruning_helpers import calibrate

from compressor import CompressionSession, Recipe, RecipeError
from compressor.modifiers import HeadPruningModifier
from compressor.modifiers.pruning import StructureMapping
from conftest import tiny_llama_config


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _prune_and_check(model, batches, tmp_path, density, heads, kv_heads):
    from transformers import LlamaForCausalLM

    config = model.config
    head_dim, hidden = config.head_dim, config.hidden_size
    dense, layers = _count(model), config.num_hidden_layers
    modifier = HeadPruningModifier(density=density)
    session = CompressionSession()
    session.initialize(model=model, recipe=[modifier])
    calibrate(model, session, batches)
    # masked (not yet removed): whole heads are zero in q, k, v and o
    attn = model.model.layers[0].self_attn
    zero_q = (attn.q_proj.weight.view(config.num_attention_heads, -1) == 0).all(1)
    assert int(zero_q.sum()) == config.num_attention_heads - heads
    masked = _logits(model, batches[0])
    removed_q = (config.num_attention_heads - heads) * head_dim
    removed_kv = (config.num_key_value_heads - kv_heads) * head_dim
    session.finalize()

    assert config.num_attention_heads == heads and config.num_key_value_heads == kv_heads
    assert attn.q_proj.weight.shape == (heads * head_dim, hidden)
    assert attn.k_proj.weight.shape == (kv_heads * head_dim, hidden)
    assert attn.o_proj.weight.shape == (hidden, heads * head_dim)
    assert dense - _count(model) == layers * hidden * (2 * removed_q + 2 * removed_kv)
    torch.testing.assert_close(_logits(model, batches[0]), masked, rtol=0, atol=1e-5)

    model.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(again, batches[0]), _logits(model, batches[0]))


def test_gqa_prunes_whole_key_value_groups(tiny_llama, token_batches, tmp_path):
    # 4 query heads over 2 key-value heads: half the groups = 1 kv head and its 2 query heads
    _prune_and_check(tiny_llama, token_batches, tmp_path, 0.5, heads=2, kv_heads=1)


def test_multi_head_attention_prunes_heads(token_batches, tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_key_value_heads=4)).eval()
    _prune_and_check(model, token_batches, tmp_path, 0.5, heads=2, kv_heads=2)


def test_a_head_count_the_config_rejects_fails_before_any_work(token_batches):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(num_key_value_heads=4)).eval()
    # 3 of 4 heads: LlamaConfig wants hidden_size (32) divisible by num_attention_heads
    with pytest.raises(ValueError, match=r"needs config .*'num_attention_heads': 3.*rejects"):
        CompressionSession().initialize(model=model, recipe=[HeadPruningModifier(density=0.75)])


@pytest.mark.integration
def test_real_model_heads_and_reload(stories_model_path, tmp_path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(stories_model_path).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 512, (1, 32), generator=gen)} for _ in range(2)]
    # 8 query heads over 4 kv heads of size 8: keep 2 groups = 4 query heads
    _prune_and_check(model, batches, tmp_path, 0.5, heads=4, kv_heads=2)


def test_a_head_count_that_does_not_divide_the_projections_is_refused(tiny_llama):
    mapping = StructureMapping(
        blocks="model.layers",
        producers=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        consumers=["self_attn.o_proj"],
        num_units=3,
    )
    session = CompressionSession()
    with pytest.raises(ValueError, match="q_proj has 32 outputs, not a multiple of num_units=3"):
        session.initialize(
            model=tiny_llama, recipe=[HeadPruningModifier(density=0.5, mappings=[mapping])]
        )


def test_mapping_override_round_trips_and_rejects_unknown_keys():
    text = (
        "modifiers:\n  - HeadPruningModifier:\n      sparsity: 0.5\n      mappings:\n"
        "        - {blocks: model.layers, producers: [a.q, a.k, a.v], consumers: [a.o],"
        " num_units: 4, config: {num_attention_heads: 1}}\n"
    )
    recipe = Recipe.from_yaml(text)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again.modifiers[0].model_dump() == recipe.modifiers[0].model_dump()
    with pytest.raises(RecipeError, match="heads"):
        Recipe.from_yaml(text.replace("num_units: 4", "heads: 4"))


def test_unknown_architecture_says_what_to_pass():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match=r"no heads mapping for GPT2LMHeadModel.*Pass mappings"):
        CompressionSession().initialize(model=model, recipe=[HeadPruningModifier(density=0.5)])

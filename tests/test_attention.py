"""CPU models load with the grouped-query ``sdpa`` of :mod:`mpo_core.common.attention`: at inference its
answers equal transformers' ``sdpa`` bit for bit (padded batches, packed 4D masks, generation), and where
gradients are on it is transformers' ``sdpa`` itself."""

from __future__ import annotations

import pytest
import torch

from mpo_core.common.attention import GROUPED_SDPA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(default_model_config):
    from mpo_core.common.models import load_model, load_tokenizer

    return (load_model(default_model_config), load_model(default_model_config, attn_implementation="sdpa"),
            load_tokenizer(default_model_config, padding_side="left"))


def _padded_batch(tokenizer):
    texts = ["How do I make a simple tomato soup at home?", "Hi", "Ninawezaje kupika supu rahisi ya nyanya?"]
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_cpu_models_load_with_grouped_sdpa_and_its_inference_equals_sdpa_bit_for_bit(models):
    from mpo_core.method.packed import paired_final_hidden_states

    grouped, plain, tokenizer = models
    assert grouped.config._attn_implementation == GROUPED_SDPA and plain.config._attn_implementation == "sdpa"
    assert grouped.config.num_key_value_heads < grouped.config.num_attention_heads  # grouped heads to keep
    batch = _padded_batch(tokenizer)
    with torch.inference_mode():
        assert torch.equal(grouped(**batch).logits, plain(**batch).logits)
        settings = {"max_new_tokens": 12, "do_sample": False}
        assert torch.equal(grouped.generate(**batch, **settings), plain.generate(**batch, **settings))
        ids = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 3, 9, 9, 9], [1, 2, 3, 4, 0, 0], [1, 2, 3, 7, 7, 0]])
        mask = (ids != 0).long()
        assert torch.equal(paired_final_hidden_states(grouped, ids, mask),  # a packed 4D boolean mask
                           paired_final_hidden_states(plain, ids, mask))


def test_grouped_sdpa_with_gradients_is_transformers_sdpa(models):
    grouped, plain, tokenizer = models
    batch = _padded_batch(tokenizer)
    grads = []
    for model in (grouped, plain):
        model.zero_grad()
        (model(**batch).logits * batch["attention_mask"][..., None]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(grads[0], grads[1])

"""Response log-likelihoods and pooled states on the real default model: the chunked path against the
full-logits yardstick, masking, padding invariance, truncation, batching order."""

from __future__ import annotations

import copy

import pytest
import torch

from mpo_core import logps
from mpo_core.logps import (
    collate_sequences,
    encode_prompt_response,
    full_logits_outputs,
    render_prompt,
    response_avg_logps,
    reward_gaps,
    sequence_outputs,
)

PROMPTS = ["How do I bake bread at home?", "¿Cómo puedo robar un coche?", "写一首关于秋天的诗"]
RESPONSES = [
    "Mix flour, water, salt and yeast, knead, let it rise and bake.",
    "No puedo ayudar con eso.",
    "秋风",
]


@pytest.fixture(scope="module")
def model_and_tokenizer(default_model_config):
    from mpo_core.models import load_model, load_tokenizer

    return load_model(default_model_config).eval(), load_tokenizer(default_model_config)


def _encoded(tokenizer, max_length: int = 64):
    return [encode_prompt_response(tokenizer, p, r, max_length) for p, r in zip(PROMPTS, RESPONSES)]


def test_encoding_masks_prompt_and_ends_with_eos(model_and_tokenizer):
    _, tok = model_and_tokenizer
    enc = encode_prompt_response(tok, PROMPTS[0], RESPONSES[0], 256)
    prompt_ids = tok(render_prompt(tok, PROMPTS[0]), add_special_tokens=False)["input_ids"]
    assert enc.input_ids[: enc.prompt_len] == prompt_ids
    assert enc.input_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids[enc.prompt_len : -1]) == RESPONSES[0]
    batch = collate_sequences(_encoded(tok), tok.pad_token_id)
    for row, e in enumerate(_encoded(tok)):
        assert batch["response_mask"][row].sum().item() == e.num_response_tokens
        assert not batch["response_mask"][row, : e.prompt_len].any()
        assert batch["attention_mask"][row].sum().item() == len(e.input_ids)


def test_truncation_keeps_max_length_and_a_response(model_and_tokenizer):
    _, tok = model_and_tokenizer
    enc = encode_prompt_response(tok, PROMPTS[0] * 20, RESPONSES[0] * 20, 48)
    assert len(enc.input_ids) == 48
    assert enc.num_response_tokens >= 24
    assert (
        enc.input_ids[enc.prompt_len - 3 :][:3]
        == tok(render_prompt(tok, "x"), add_special_tokens=False)["input_ids"][-3:]
    )


def test_chunked_path_matches_full_logits(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    batch = collate_sequences(_encoded(tok), tok.pad_token_id)
    monkeypatch.setattr(logps, "LOGITS_CHUNK_ELEMENTS", model.config.vocab_size * 7)  # several chunks
    with torch.no_grad():
        ours = sequence_outputs(model, batch)
        paper = full_logits_outputs(model, batch)
    torch.testing.assert_close(ours["avg_logps"], paper["avg_logps"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["pooled"], paper["pooled"], atol=1e-5, rtol=1e-5)


def test_chunked_gradients_match_full_logits(model_and_tokenizer, monkeypatch):
    """Same gradients as the full-logits path, in float64 so that only the maths, not float32 summation
    order, is compared (float32 agrees to ~1e-4 relative)."""
    model, tok = model_and_tokenizer
    model64 = copy.deepcopy(model).double()
    batch = collate_sequences(_encoded(tok, 28)[1:], tok.pad_token_id)
    monkeypatch.setattr(logps, "LOGITS_CHUNK_ELEMENTS", model.config.vocab_size * 3)
    params = [model64.model.layers[-1].mlp.down_proj.weight, model64.lm_head.weight]
    grads = []
    for fn in (sequence_outputs, full_logits_outputs):
        out = fn(model64, batch)
        total = out["avg_logps"].sum() + out["pooled"].square().mean()
        grads.append(torch.autograd.grad(total, params))
    for ours, paper in zip(*grads):
        torch.testing.assert_close(ours, paper, atol=1e-10, rtol=1e-9)


def test_padding_length_and_values_do_not_change_results(model_and_tokenizer):
    model, tok = model_and_tokenizer
    enc = _encoded(tok)
    with torch.no_grad():
        base = sequence_outputs(model, collate_sequences(enc, tok.pad_token_id))
        longer = sequence_outputs(model, collate_sequences(enc, 7, pad_to=90))
        alone = sequence_outputs(model, collate_sequences(enc[2:], tok.pad_token_id))
    for key in ("avg_logps", "pooled"):
        torch.testing.assert_close(longer[key], base[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone[key][0], base[key][2], atol=1e-5, rtol=1e-5)


def test_batched_api_keeps_input_order(model_and_tokenizer):
    model, tok = model_and_tokenizer
    one = response_avg_logps(model, tok, PROMPTS, RESPONSES, max_length=64, batch_size=1)
    many = response_avg_logps(model, tok, PROMPTS, RESPONSES, max_length=64, batch_size=3)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
    assert one.dtype == torch.float32 and one.shape == (3,) and (one < 0).all()
    rejected = ["Sure, here is how.", "Claro, así se hace.", "好的"]
    gaps = reward_gaps(model, tok, PROMPTS, RESPONSES, rejected, max_length=64, batch_size=2)
    other = response_avg_logps(model, tok, PROMPTS, rejected, max_length=64, batch_size=2)
    torch.testing.assert_close(gaps, one - other, atol=1e-5, rtol=1e-5)

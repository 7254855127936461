"""Response log-likelihoods and pooled states on the real default model: the chunked path against the
full-logits yardstick, masking, padding invariance, truncation, batching order."""

from __future__ import annotations

import copy

import pytest
import torch

from mpo_core.method import encoding, lm_head, packed
from mpo_core.method.encoding import (
    collate_sequences,
    encode_prompt_response,
    encode_prompt_responses,
    render_prompt,
)
from mpo_core.method.logps import full_logits_outputs, response_avg_logps, reward_gaps, sequence_outputs
from mpo_core.method.packed import pair_prefix_lengths

PROMPTS = ["How do I bake bread at home?", "¿Cómo puedo robar un coche?", "写一首关于秋天的诗"]
RESPONSES = [
    "Mix flour, water, salt and yeast, knead, let it rise and bake.",
    "No puedo ayudar con eso.",
    "秋风",
]


@pytest.fixture(scope="module")
def model_and_tokenizer(default_model_config):
    from mpo_core.common.models import load_model, load_tokenizer

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
    monkeypatch.setattr(lm_head, "LOGITS_CHUNK_ELEMENTS", model.config.vocab_size * 7)  # several chunks
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
    monkeypatch.setattr(lm_head, "LOGITS_CHUNK_ELEMENTS", model.config.vocab_size * 3)
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



def test_reward_gaps_encode_as_training_does(model_and_tokenizer):
    """The evaluation's RG uses ``model.truncation``: with a long prompt, LLaMA-Factory's cut keeps the
    prompt's start and gives other gaps than mpo's left cut; each equals the gap of its own encoding."""
    model, tok = model_and_tokenizer
    prompt, chosen, rejected = ["word " * 40 + PROMPTS[0]], ["No, I won't."], [RESPONSES[0] * 3]
    by_cut = {}
    for cut in ("prompt_left", "llama_factory"):
        gap = reward_gaps(model, tok, prompt, chosen, rejected, max_length=40, batch_size=1, truncation=cut)
        enc = encode_prompt_responses(tok, prompt[0], [chosen[0], rejected[0]], 40, truncation=cut)
        batch = collate_sequences(list(enc), tok.pad_token_id)
        avg = sequence_outputs(model, batch, with_pooled=False)["avg_logps"]
        torch.testing.assert_close(gap, (avg[0] - avg[1]).reshape(1), atol=1e-5, rtol=1e-5)
        by_cut[cut] = float(gap)
    assert abs(by_cut["prompt_left"] - by_cut["llama_factory"]) > 1e-3

REJECTED = ["Mix flour and sugar, then fry it.", "Claro, primero busca un coche abierto.", "好的"]


def _pair_batch(tokenizer, max_length: int = 80) -> dict[str, torch.Tensor]:
    """Chosen rows, then rejected rows; pair 0 shares the start of its answers too ("Mix flour")."""
    pairs = [
        encode_prompt_responses(tokenizer, p, [c, r], max_length)
        for p, c, r in zip(PROMPTS, RESPONSES, REJECTED)
    ]
    return collate_sequences([c for c, _ in pairs] + [r for _, r in pairs], tokenizer.pad_token_id)


def test_a_pair_shares_one_prompt_cut(model_and_tokenizer):
    _, tok = model_and_tokenizer
    chosen, rejected = encode_prompt_responses(tok, PROMPTS[0] * 20, ["No.", RESPONSES[0] * 20], 48)
    assert chosen.prompt_len == rejected.prompt_len
    assert chosen.input_ids[: chosen.prompt_len] == rejected.input_ids[: rejected.prompt_len]
    assert len(rejected.input_ids) == 48 and len(chosen.input_ids) < 48
    assert rejected.num_response_tokens >= 24
    alone = encode_prompt_response(tok, PROMPTS[0] * 20, RESPONSES[0] * 20, 48)
    assert alone.input_ids == rejected.input_ids


def test_paired_forward_runs_each_prompt_once_with_the_same_results_and_gradients(model_and_tokenizer):
    """Rows b and b+n share their prompt (and, for pair 0, the first answer tokens): the paired forward
    runs that prefix once, yet values and gradients equal the plain forward (float64, so that only the maths
    is compared)."""
    model, tok = model_and_tokenizer
    model64 = copy.deepcopy(model).double()
    batch = _pair_batch(tok)
    n = len(PROMPTS)
    prefix = pair_prefix_lengths(batch["input_ids"], batch["attention_mask"])
    prompt_lens = [len(tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert prefix[0] > prompt_lens[0] and prefix[1:].tolist() == prompt_lens[1:]

    tokens_seen = []  # real (non-padding) tokens entering the backbone

    def count_tokens(module, args, kwargs):
        mask = kwargs["attention_mask"]  # packed 4D: every real token sees its row's first token
        tokens_seen.append(int(mask.sum() if mask.dim() == 2 else mask[:, 0, :, 0].sum()))

    hook = model64.model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    params = [model64.model.layers[0].self_attn.k_proj.weight, model64.model.layers[-1].mlp.down_proj.weight]
    results = {}
    try:
        for paired in (False, True):
            tokens_seen.clear()
            out = sequence_outputs(model64, batch, paired=paired)
            total = out["avg_logps"].sum() + out["pooled"].square().mean()
            results[paired] = (out, torch.autograd.grad(total, params), sum(tokens_seen))
    finally:
        hook.remove()
    (plain, plain_grads, plain_tokens), (shared, shared_grads, shared_tokens) = results[False], results[True]
    assert plain_tokens == int(batch["attention_mask"].sum())
    assert shared_tokens == plain_tokens - int(prefix.sum())
    for key in ("avg_logps", "pooled"):
        torch.testing.assert_close(shared[key], plain[key], atol=1e-10, rtol=1e-9)
    for ours, reference in zip(shared_grads, plain_grads):  # the model's RMSNorm runs in float32 even here
        assert (ours - reference).norm() / reference.norm() < 1e-6
    assert shared["avg_logps"].shape == (2 * n,)


def test_paired_forward_without_a_shared_prefix_falls_back(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batch = _pair_batch(tok)
    batch["input_ids"][0, 0] = batch["input_ids"][0, 0] + 1  # pair 0 now shares no first token
    assert pair_prefix_lengths(batch["input_ids"], batch["attention_mask"])[0] == 0
    with torch.no_grad():
        shared = sequence_outputs(model, batch, paired=True)
        plain = sequence_outputs(model, batch)
    for key in ("avg_logps", "pooled"):
        torch.testing.assert_close(shared[key], plain[key], atol=0, rtol=0)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_token_logps_has_the_exact_gradient(softcap):
    """The hand-written backward against autograd's numerical Jacobian (float64), several chunks, a
    repeated target, with and without a final-logit softcap."""
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 3, 10, 5, 1, 3])

    def fn(h, w):
        return lm_head.ChunkedTokenLogps.apply(h, w, targets, 3, softcap)

    torch.autograd.gradcheck(fn, (hidden, weight))
    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    expected = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(fn(hidden, weight), expected, atol=1e-12, rtol=1e-12)


def test_paired_forward_under_eager_attention_takes_an_additive_mask(model_and_tokenizer):
    """Eager attention (Gemma-2's, for its softcap) adds the mask to the scores: the float form of the packed
    mask gives the plain forward's values."""
    model, tok = model_and_tokenizer
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    batch = _pair_batch(tok)
    with torch.no_grad():
        shared = sequence_outputs(eager, batch, paired=True)
        plain = sequence_outputs(model, batch)
    for key in ("avg_logps", "pooled"):
        torch.testing.assert_close(shared[key], plain[key], atol=1e-4, rtol=1e-4)


def _autocast_chunked_gradients(device: str, chunk: int) -> tuple[dict, dict]:
    """Gradients of the chunked head and of autograd through the same bf16 autocast computation
    (fp32 weights, bf16 matmul, fp32 log-softmax), on ``device``."""
    torch.manual_seed(0)
    hidden = torch.randn(12, 64, device=device, requires_grad=True)
    weight = torch.randn(500, 64, device=device).requires_grad_()  # logits of std 8, as trained LMs have
    targets = torch.randint(0, 500, (12,), device=device)
    grad_out = torch.randn(12, device=device)
    results = []
    for chunked in (True, False):
        hidden.grad = weight.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            if chunked:
                out = lm_head.ChunkedTokenLogps.apply(hidden, weight, targets, chunk, None)
            else:
                logits = (hidden @ weight.T).float()
                out = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        (out * grad_out).sum().backward()
        results.append({"out": out.detach(), "hidden": hidden.grad.clone(), "weight": weight.grad.clone()})
    return results[0], results[1]


def test_chunked_token_logps_is_autocast_safe():
    """Under bf16 autocast the backward recomputes the forward's bf16 logits (not fp32 ones): the gradients
    are autograd's through the same autocast computation."""
    chunked, autograd = _autocast_chunked_gradients("cpu", chunk=5)
    for key in ("out", "hidden", "weight"):
        difference = (chunked[key] - autograd[key]).norm() / autograd[key].norm()
        assert difference < 5e-3, (key, float(difference))


@pytest.mark.gpu
def test_chunked_token_logps_bf16_gradients_on_cuda(check_device):
    chunked, autograd = _autocast_chunked_gradients(check_device, chunk=5)
    for key in ("out", "hidden", "weight"):
        difference = (chunked[key] - autograd[key]).norm() / autograd[key].norm()
        assert difference < 5e-3, (key, float(difference))


@pytest.mark.parametrize(
    ("architecture", "attention", "extra"),
    [("gemma2", "eager", {}), ("qwen2", "sdpa", {"use_sliding_window": True, "max_window_layers": 0})],
)
def test_paired_forward_respects_a_sliding_window(architecture, attention, extra):
    """Gemma-2 alternates sliding-window and global layers (Qwen2 can too): with sequences longer than the
    window, the packed pair forward gives the plain forward's states (the window is built into the sliding
    layers' mask)."""
    from mpo_core.method.synthetic import random_pairs, synthetic_causal_lm

    model = synthetic_causal_lm(
        architecture, attn_implementation=attention, dtype=torch.float64, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], **extra,
    ).eval()
    pairs = random_pairs(3, prompt_len=11, response_len=14, vocab=512, generator=torch.Generator().manual_seed(0))
    batch = encoding.collate_pairs(pairs, 0)
    assert packed.binding_sliding_window(model.config, int(batch["attention_mask"].sum(1).max())) == 8
    with torch.no_grad():
        packed_states = packed.paired_final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        plain = packed.final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(packed_states[real], plain[real], atol=1e-5, rtol=1e-5)  # Gemma-2 eager: ~5e-7 noise


def test_sliding_window_without_a_mask_per_layer_type_falls_back():
    """A model with one sliding window for every layer and no ``layer_types`` (Mistral-style) cannot take
    two masks: a binding window sends the pair through the plain forward."""
    config = type("Config", (), {"sliding_window": 8, "layer_types": None})()
    assert packed.binding_sliding_window(config, 9) == 8 and not packed.takes_mask_mapping(config)
    assert packed.binding_sliding_window(config, 8) is None

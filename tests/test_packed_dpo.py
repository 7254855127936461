"""Align's DPO runs each pair packed (:mod:`mpo_core.training.packed_dpo`): the same log-probabilities and
gradients as TRL's padded layout, on the real default model, for fewer tokens; other calls untouched."""

from __future__ import annotations

import pytest
import torch

from mpo_core.method.packed import split_causal_lm
from mpo_core.training.packed_dpo import packed_pair_backbone

pytestmark = pytest.mark.slow


def _dpo_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's layout: rows b and b + n are pair b's prompt + chosen and prompt + rejected, right-padded."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
               for text in ("How do I pick a lock?", "Write a short poem about the sea, please, in four lines.")]
    answers = [("I can't help with that.", "Sure: take a tension wrench and a pick, then"),
               ("Waves fold in silver light,", "I won't write that.")]
    chosen, rejected = [], []
    for prompt, (good, bad) in zip(prompts, answers):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        chosen.append(ids + tokenizer(good, add_special_tokens=False)["input_ids"])
        rejected.append(ids + tokenizer(bad, add_special_tokens=False)["input_ids"])
    rows = chosen + rejected
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def test_packed_pairs_give_the_padded_log_probs_and_gradients(default_model_config):
    from mpo_core.common.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(default_model_config)
    model = load_model(default_model_config)
    backbone, head, _ = split_causal_lm(model)
    ids, mask = _dpo_batch(tokenizer)

    def response_logps(packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        with packed_pair_backbone(model) if packed else torch.enable_grad():
            hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logps = torch.log_softmax(head(hidden[:, :-1]), -1).gather(-1, ids[:, 1:, None])[..., 0]
        per_row = (logps * mask[:, 1:]).sum(dim=1)
        per_row.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return per_row.detach(), grads

    padded, padded_grads = response_logps(False)
    packed, packed_grads = response_logps(True)
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-3)
    assert ((packed_grads - padded_grads).norm() / padded_grads.norm()).item() < 1e-4
    assert "forward" not in vars(backbone)  # the block restores the class's own forward
    odd = backbone(input_ids=ids[:3], attention_mask=mask[:3], use_cache=False).last_hidden_state
    assert odd.shape[0] == 3  # not a pair layout: runs as it is


def test_trls_lm_head_scores_only_the_labelled_positions_on_cpu(default_model_config, monkeypatch):
    """Within ``labelled_positions_only`` TRL's fused LM head projects the answers' positions only (on CPU it
    would project every position): the same log-probabilities and gradients, a fraction of the rows."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from mpo_core.common.models import load_model, load_tokenizer
    from mpo_core.training.packed_dpo import labelled_positions_only

    tokenizer = load_tokenizer(default_model_config)
    model = load_model(default_model_config)
    add_fused_lm_head(model)
    ids, mask = _dpo_batch(tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How do I pick a lock?"}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])  # the shorter prompt
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt_length] = -100
    scored_rows = []
    chunked = trl_utils._ChunkedLogProbFunction

    class CountingChunkedLogProb(chunked):
        @staticmethod
        def forward(ctx, hidden, *args):
            scored_rows.append(hidden.shape[0])
            return chunked.forward(ctx, hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", CountingChunkedLogProb)

    def log_probs(labelled_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        with labelled_positions_only() if labelled_only else torch.enable_grad():
            per_token = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
        per_token.sum().backward()
        return per_token.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    every, every_grads = log_probs(False)
    labelled, labelled_grads = log_probs(True)
    assert scored_rows == [ids.shape[0] * (ids.shape[1] - 1), int((labels[:, 1:] != -100).sum())]
    assert scored_rows[1] < scored_rows[0] / 2
    torch.testing.assert_close(labelled, every, rtol=1e-5, atol=1e-5)
    assert ((labelled_grads - every_grads).norm() / every_grads.norm()).item() < 1e-5
    assert trl_utils._use_triton(torch.device("cpu")) is False  # restored after the block

"""Response log-likelihoods and pooled hidden states of (prompt, response) sequences.

A sequence is the chat-template rendering of the user ``prompt`` (with the generation header) followed by
the ``response`` tokens and the end-of-turn (EOS) token; labels cover the response tokens only.

``s(y|x) = (1/|y|) sum_{i in response} log pi(y_i | x, y_<i)`` is computed without ever materialising
full-vocabulary logits for the whole batch: the base model (no LM head) gives the final hidden states, the
positions that predict a response token are selected, and the LM head is applied to them in chunks with
``logsumexp``/``gather``. Under autograd each chunk is recomputed in the backward pass (activation
checkpointing), so at most one chunk of logits is alive at any time. Sequences that only need pooled
states (the dominant side in training, for L2) skip the LM head entirely.

Batches are right-padded; padding never changes a result (real tokens never attend to later positions,
and padding is excluded from every sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from mpo_core.losses import masked_mean_pool, reward_gap

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LOGITS_CHUNK_ELEMENTS = 1 << 24  # at most this many logits (64 MiB in float32) per chunk


@dataclass(frozen=True)
class EncodedSequence:
    """Token ids of one prompt+response sequence; ``input_ids[prompt_len:]`` are the response tokens."""

    input_ids: list[int]
    prompt_len: int

    @property
    def num_response_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as the chat template renders a single user turn, ending with the assistant header."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> EncodedSequence:
    """Tokenise ``chat_template(prompt) + response + EOS`` into at most ``max_length`` tokens.

    When too long, the response is cut first down to ``max(max_length - len(prompt), max_length // 2)``
    tokens (keeping its start), then the prompt is cut from the left (keeping the assistant header). At
    least one response token always remains.
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(response_ids) > max_length:
        response_ids = response_ids[: max(max_length - len(prompt_ids), max_length // 2, 1)]
        keep_prompt = max(max_length - len(response_ids), 1)
        prompt_ids = prompt_ids[-keep_prompt:]
    return EncodedSequence(list(prompt_ids) + list(response_ids), len(prompt_ids))


def collate_sequences(
    sequences: Sequence[EncodedSequence], pad_token_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad into ``input_ids``, ``attention_mask`` (real tokens) and ``response_mask`` (labels)."""
    length = max(max(len(s.input_ids) for s in sequences), pad_to or 0)
    batch = len(sequences)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    response_mask = torch.zeros((batch, length), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        n = len(seq.input_ids)
        input_ids[row, :n] = torch.tensor(seq.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        response_mask[row, seq.prompt_len : n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def split_causal_lm(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """``(backbone, lm_head, final_logit_softcapping)`` of a causal LM, a peft wrapper unwrapped."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = base.get_decoder()
    lm_head = base.get_output_embeddings()
    return backbone, lm_head, getattr(base.config, "final_logit_softcapping", None)


def final_hidden_states(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The backbone's final (post-norm) hidden states ``[B, T, H]``: the LM head's input, no logits."""
    backbone, _, _ = split_causal_lm(model)
    return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _chunk_token_logps(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, softcap: float | None
) -> torch.Tensor:
    logits = lm_head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def response_logp_sums(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i log pi(y_i | x, y_<i), |y|)`` per row, from final hidden states, response tokens only.

    Position ``t`` predicts token ``t + 1``; only positions predicting a response token reach the LM head,
    in chunks of at most :data:`LOGITS_CHUNK_ELEMENTS` logits.
    """
    _, lm_head, softcap = split_causal_lm(model)
    predicts_response = response_mask[:, 1:]
    rows = predicts_response.nonzero(as_tuple=True)[0]
    selected = hidden[:, :-1][predicts_response]
    targets = input_ids[:, 1:][predicts_response]
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // lm_head.out_features)
    recompute = torch.is_grad_enabled() and selected.requires_grad
    pieces = []
    for start in range(0, selected.shape[0], chunk):
        args = (selected[start : start + chunk], targets[start : start + chunk], lm_head, softcap)
        if recompute:
            pieces.append(checkpoint(_chunk_token_logps, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(*args))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0).float()
    sums = torch.zeros(hidden.shape[0], dtype=token_logps.dtype, device=hidden.device).index_add(
        0, rows, token_logps
    )
    counts = predicts_response.sum(dim=1)
    return sums, counts


def sequence_outputs(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    *,
    with_logps: bool = True,
    with_pooled: bool = True,
) -> dict[str, torch.Tensor]:
    """One backbone forward of a collated batch: ``avg_logps`` [B] (response tokens) and/or ``pooled`` [B, H]
    (mean of the final hidden states over real tokens)."""
    hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    out: dict[str, torch.Tensor] = {}
    if with_logps:
        sums, counts = response_logp_sums(model, hidden, batch["input_ids"], batch["response_mask"])
        out["logp_sums"], out["response_tokens"] = sums, counts
        out["avg_logps"] = sums / counts.clamp_min(1).to(sums.dtype)
    if with_pooled:
        out["pooled"] = masked_mean_pool(hidden, batch["attention_mask"])
    return out


def full_logits_outputs(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper code's way, kept as the yardstick for tests and benchmarks: full-vocabulary logits of the
    whole batch through ``model(...)``, upcast to float32, ``log_softmax``, masked mean over the response;
    pooled states from ``hidden_states[-1]`` (here pooled over real tokens, as everywhere in mpo)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        use_cache=False,
    )
    logits = out.logits[:, :-1]
    logps = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    token_logps = logps.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = batch["response_mask"][:, 1:]
    sums = (token_logps * mask).sum(-1)
    counts = mask.sum(-1)
    return {
        "avg_logps": sums / counts.clamp_min(1),
        "pooled": masked_mean_pool(out.hidden_states[-1], batch["attention_mask"]),
    }


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first) to cut padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _model_device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def response_avg_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    *,
    max_length: int,
    batch_size: int,
) -> torch.Tensor:
    """``s(y|x)`` for each (prompt, response) pair, in input order, as a float32 CPU tensor (no grad)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    encoded = [encode_prompt_response(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    result = torch.zeros(len(encoded), dtype=torch.float32)
    device = _model_device(model)
    for idx in length_sorted_batches([len(e.input_ids) for e in encoded], batch_size):
        batch = {
            k: v.to(device)
            for k, v in collate_sequences([encoded[i] for i in idx], tokenizer.pad_token_id).items()
        }
        result[idx] = sequence_outputs(model, batch, with_pooled=False)["avg_logps"].float().cpu()
    return result


def reward_gaps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    *,
    max_length: int,
    batch_size: int,
) -> torch.Tensor:
    """``RG = s(y_w|x) - s(y_l|x)`` per prompt under ``model`` (float32 CPU tensor, no grad)."""
    kwargs = {"max_length": max_length, "batch_size": batch_size}
    return reward_gap(
        response_avg_logps(model, tokenizer, prompts, chosen, **kwargs),
        response_avg_logps(model, tokenizer, prompts, rejected, **kwargs),
    )

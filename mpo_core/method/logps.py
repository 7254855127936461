"""Response log-likelihoods and pooled hidden states of (prompt, response) sequences: the scoring API.

``s(y|x) = (1/|y|) sum_{i in response} log pi(y_i | x, y_<i)`` from one backbone forward
(:mod:`mpo_core.method.packed`) whose response positions go through the chunked LM head
(:mod:`mpo_core.method.lm_head`); sequences that only need pooled states (the dominant side in training, for
L2) skip the head entirely. Encoding and collation: :mod:`mpo_core.method.encoding`.

Batches are right-padded; padding never changes a result (real tokens never attend to later positions,
and padding is excluded from every sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mpo_core.method.encoding import (
    collate_pairs,
    collate_sequences,
    encode_prompt_response,
    encode_prompt_responses,
)
from mpo_core.method.lm_head import response_logp_sums
from mpo_core.method.losses import masked_mean_pool, reward_gap
from mpo_core.method.packed import final_hidden_states, paired_final_hidden_states

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def sequence_outputs(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    *,
    with_logps: bool = True,
    with_pooled: bool = True,
    paired: bool = False,
) -> dict[str, torch.Tensor]:
    """One backbone forward of a collated batch: ``avg_logps`` [B] (response tokens) and/or ``pooled`` [B, H]
    (mean of the final hidden states over real tokens). ``paired``: rows ``b`` and ``b + B/2`` are the chosen
    and rejected sequence of one pair, and their shared prompt runs once (:func:`paired_final_hidden_states`)."""
    hidden_states = paired_final_hidden_states if paired else final_hidden_states

    def reduce(hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if with_logps:
            sums, counts = response_logp_sums(model, hidden, batch["input_ids"], batch["response_mask"])
            out["logp_sums"], out["response_tokens"] = sums, counts
            out["avg_logps"] = sums / counts.clamp_min(1).to(sums.dtype)
        if with_pooled:
            out["pooled"] = masked_mean_pool(hidden, batch["attention_mask"])
        return out

    return hidden_states(model, batch["input_ids"], batch["attention_mask"], reduce)


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


@torch.no_grad()
def pair_avg_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    *,
    max_length: int,
    batch_size: int,
    truncation: str = "prompt_left",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s(y_w|x), s(y_l|x))`` per pair, in input order, as float32 CPU tensors (no grad), encoded as the
    reference stage and the trainer encode a pair (one prompt cut for both answers by ``truncation``, the
    prompt run once)."""
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected")
    encoded = [
        encode_prompt_responses(tokenizer, p, [c, r], max_length, truncation=truncation)
        for p, c, r in zip(prompts, chosen, rejected)
    ]
    result = torch.zeros(2, len(encoded), dtype=torch.float32)
    device = _model_device(model)
    lengths = [max(len(c.input_ids), len(r.input_ids)) for c, r in encoded]
    for idx in length_sorted_batches(lengths, batch_size):
        collated = collate_pairs([encoded[i] for i in idx], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in collated.items()}
        avg = sequence_outputs(model, batch, with_pooled=False, paired=True)["avg_logps"].float().cpu()
        result[:, idx] = avg.view(2, len(idx))
    return result[0], result[1]


def reward_gaps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    *,
    max_length: int,
    batch_size: int,
    truncation: str = "prompt_left",
) -> torch.Tensor:
    """``RG = s(y_w|x) - s(y_l|x)`` per prompt under ``model`` (float32 CPU tensor, no grad)."""
    return reward_gap(
        *pair_avg_logps(
            model, tokenizer, prompts, chosen, rejected, max_length=max_length, batch_size=batch_size,
            truncation=truncation,
        )
    )

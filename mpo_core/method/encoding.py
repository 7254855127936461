"""Token ids of (prompt, response) sequences and their collation into batches.

A sequence is the chat-template rendering of the user ``prompt`` (with the generation header) followed by
the ``response`` tokens and the end-of-turn (EOS) token; labels cover the response tokens only. The chosen
and rejected answers of a pair share one prompt cut (``truncation``), so their prompts are token-identical.
Batches are right-padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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


def encode_prompt_responses(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    responses: Sequence[str],
    max_length: int,
    *,
    truncation: str = "prompt_left",
) -> list[EncodedSequence]:
    """Tokenise ``chat_template(prompt) + response + EOS`` for each response, into at most ``max_length``
    tokens each, all with the same prompt tokens.

    ``truncation="prompt_left"`` (mpo's): each response is cut first down to
    ``max(max_length - len(prompt), max_length // 2)`` tokens (keeping its start), then the prompt is cut
    from the left (keeping the assistant header) to fit the longest response.
    ``truncation="llama_factory"`` (the official MPO code's): the budget is split as LLaMA-Factory splits it
    between the prompt and the longest response (:func:`llama_factory_lengths`), and both are cut from the
    right (the prompt may lose its assistant header).
    At least one response token always remains. One shared prompt cut keeps the chosen and rejected answers
    of a pair answering the same prompt, and lets their prefix run once (:func:`paired_final_hidden_states`).
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    response_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + eos for r in responses]
    longest = max((len(ids) for ids in response_ids), default=0)
    if truncation == "llama_factory":
        prompt_keep, response_keep = llama_factory_lengths(len(prompt_ids), longest, max_length)
        prompt_ids, response_ids = prompt_ids[:prompt_keep], [ids[:response_keep] for ids in response_ids]
    else:
        response_budget = max(max_length - len(prompt_ids), max_length // 2, 1)
        response_ids = [ids[:response_budget] for ids in response_ids]
        longest = max((len(ids) for ids in response_ids), default=0)
        prompt_ids = prompt_ids[-max(max_length - longest, 1) :]
    return [EncodedSequence(list(prompt_ids) + ids, len(prompt_ids)) for ids in response_ids]


TRUNCATIONS = ("prompt_left", "llama_factory")


def llama_factory_lengths(prompt_len: int, response_len: int, max_length: int) -> tuple[int, int]:
    """``(prompt tokens kept, response tokens kept)`` as LLaMA-Factory's pairwise preprocessing (the official
    MPO code) splits ``max_length``: a short response keeps all it has; else a short prompt keeps all it
    has; else both share the budget in proportion to their lengths."""
    if 2 * response_len < max_length:
        response_cap = max_length
    elif 2 * prompt_len < max_length:
        response_cap = max_length - prompt_len
    else:
        response_cap = int(max_length * response_len / (prompt_len + response_len))
    response_keep = min(response_cap, response_len)
    return min(max(max_length - response_keep, 0), prompt_len), response_keep


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> EncodedSequence:
    """One sequence of :func:`encode_prompt_responses`."""
    return encode_prompt_responses(tokenizer, prompt, [response], max_length)[0]


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


def collate_pairs(
    pairs: Sequence[tuple[EncodedSequence, EncodedSequence]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Collate ``(chosen, rejected)`` encodings in the layout ``paired=True`` reads: the ``n`` chosen rows,
    then the ``n`` rejected rows, so that rows ``b`` and ``b + n`` are one pair."""
    return collate_sequences([c for c, _ in pairs] + [r for _, r in pairs], pad_token_id)

"""The generation backend interface: sampling settings, completions, and what every backend does.

A backend turns prompts into ``k`` completions each. ``chat`` takes conversations (lists of
``{"role", "content"}`` messages) and applies the model's own chat template with the generation prompt;
``complete`` takes text that is already formatted (the LLM judges build their own prompt formats).

Determinism: every request (one conversation and its ``num_samples`` completions) has its own seed,
derived from the sampling seed and the prompt's identity (:func:`request_seed`), never from its place in a
batch: the same prompt gives the same samples whatever else is generated beside it, so a stage can be cut
into batches or shards without changing its output. The transformers backend draws each sample's tokens
from a generator of its own (:func:`sample_seed`); vLLM gets ``SamplingParams(seed=...)`` per request.
``temperature == 0`` is greedy.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from mpo_core.plumbing.errors import ConfigError, InputDataError

Message = dict[str, str]


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: ``num_samples`` completions of at most ``max_new_tokens`` per prompt."""

    num_samples: int = 1
    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature == 0.0 and self.num_samples > 1:
            raise ConfigError(
                f"greedy decoding (temperature 0) gives {self.num_samples} identical samples; "
                "set a temperature > 0 or num_samples 1"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Completion:
    """One generated response; ``finish_reason`` is ``stop`` (end of sequence, a stop token) or ``length``
    (cut at ``max_new_tokens``). A request the engine aborted is a :class:`GenerationError`, never a row."""

    text: str
    finish_reason: str


def _seed_of(*parts: object) -> int:
    """63 bits of sha256 over ``parts``: a seed that torch and vLLM both take."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def request_seed(seed: int, *identity: object) -> int:
    """The seed of one request: the sampling ``seed`` and the prompt's identity (``prompt_id``, ``lang``)."""
    return _seed_of("request", seed, *identity)


def sample_seed(request: int, sample_idx: int) -> int:
    """The seed of sample ``sample_idx`` of a request (backends that draw each sample on its own)."""
    return _seed_of("sample", request, sample_idx)


def content_seeds(seed: int, requests: Sequence[object]) -> list[int]:
    """Request seeds from the requests' own content, for callers that name no identity."""
    return [request_seed(seed, repr(request)) for request in requests]


class GenerationBackend(abc.ABC):
    """Generates ``num_samples`` completions per prompt, in the prompts' order. ``seeds``: one per request
    (:func:`request_seed`); ``None`` derives them from each request's content (:func:`content_seeds`)."""

    name: str
    model_name: str

    @abc.abstractmethod
    def chat(
        self, conversations: list[list[Message]], settings: SamplingSettings, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        """Completions of each conversation under the model's chat template (generation prompt added)."""

    @abc.abstractmethod
    def complete(
        self, prompts: list[str], settings: SamplingSettings, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        """Completions of already formatted prompt texts (no template, no special tokens added)."""


def without_cut_character(text: str) -> str:
    """A completion cut at the token limit, stripped, less the U+FFFD its last tokens leave where the cut
    falls inside a multi-byte character (byte-level BPE: Chinese, Bengali...). Left there, the filter would
    drop the pair for encoding damage that generation, not the data, made."""
    return text.rstrip().rstrip("\ufffd").strip()


def reject_empty_prompts(prompts: Sequence[str], backend: str) -> None:
    """An :class:`InputDataError` naming the empty (or blank) prompts: a model has nothing to answer there,
    and the two backends would each make something different of it."""
    empty = [i for i, prompt in enumerate(prompts) if not prompt.strip()]
    if empty:
        raise InputDataError(
            f"backend {backend}: {len(empty)} empty prompt(s) of {len(prompts)}, at position(s) {empty[:10]}"
        )


def conversation_texts(conversations: Sequence[Sequence[Message]]) -> list[str]:
    """Each conversation's message texts joined: blank when every message is (for :func:`reject_empty_prompts`)."""
    return ["\n".join(message.get("content", "") for message in conversation) for conversation in conversations]


def stop_token_ids(model_eos: int | Sequence[int] | None, tokenizer_eos: int | None) -> list[int]:
    """Where both backends end a completion: the model's generation config's end-of-sequence id(s) (a chat
    model's end of turn) and the tokenizer's, sorted."""
    ids = set(model_eos if isinstance(model_eos, (list, tuple)) else [] if model_eos is None else [model_eos])
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return sorted(ids)

"""The generation backend interface: sampling settings, completions, and what every backend does.

A backend turns prompts into ``k`` completions each. ``chat`` takes conversations (lists of
``{"role", "content"}`` messages) and applies the model's own chat template with the generation prompt;
``complete`` takes text that is already formatted (the LLM judges build their own prompt formats).

Determinism: the same config on the same backend gives the same samples. The transformers backend sorts
prompts by token length (less padding), cuts them into batches and seeds torch with ``seed + batch_index``
before each batch; vLLM gets ``SamplingParams(seed=seed)`` per request. ``temperature == 0`` is greedy.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from mpo_core.plumbing.errors import ConfigError

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
    """One generated response; ``finish_reason`` is ``stop`` (end of sequence) or ``length`` (cut off)."""

    text: str
    finish_reason: str


class GenerationBackend(abc.ABC):
    """Generates ``num_samples`` completions per prompt, in the prompts' order."""

    name: str
    model_name: str

    @abc.abstractmethod
    def chat(self, conversations: list[list[Message]], settings: SamplingSettings) -> list[list[Completion]]:
        """Completions of each conversation under the model's chat template (generation prompt added)."""

    @abc.abstractmethod
    def complete(self, prompts: list[str], settings: SamplingSettings) -> list[list[Completion]]:
        """Completions of already formatted prompt texts (no template, no special tokens added)."""


def without_cut_character(text: str) -> str:
    """A completion cut at the token limit, stripped, less the U+FFFD its last tokens leave where the cut
    falls inside a multi-byte character (byte-level BPE: Chinese, Bengali...). Left there, the filter would
    drop the pair for encoding damage that generation, not the data, made."""
    return text.rstrip().rstrip("\ufffd").strip()

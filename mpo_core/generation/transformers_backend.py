"""The transformers backend: ``model.generate`` in length-sorted, token-budgeted batches with left padding (CPU
or one GPU); with several samples per prompt, the prompt's prefill runs once and its cache serves every sample.

Sampling draws every sample's next token with a generator of its own (:class:`SeededSampler`, seeded by
:func:`~mpo_core.generation.backend.sample_seed`), so a sample depends on its request's seed and the model's
probabilities only, not on the batch it was generated in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mpo_core.generation.backend import (
    Completion,
    GenerationBackend,
    Message,
    SamplingSettings,
    content_seeds,
    conversation_texts,
    reject_empty_prompts,
    sample_seed,
    stop_token_ids,
    without_cut_character,
)
from mpo_core.plumbing import profile
from mpo_core.plumbing.config import ModelConfig
from mpo_core.plumbing.progress import Tracker

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class SeededSampler:
    """A logits processor that samples each row's next token itself, with the row's own generator:
    temperature, then nucleus (``top_p``: the smallest set of tokens whose probability reaches it), then one
    draw. It returns scores that are ``-inf`` except at the drawn token, so ``generate`` run greedily keeps
    exactly that token. Rows are ``generate``'s (each request's ``num_samples`` rows next to each other)."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device) -> None:
        import torch

        self.temperature, self.top_p = temperature, top_p
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        tokens = torch.cat([torch.multinomial(row, 1, generator=gen) for row, gen in zip(probs, self.generators)])
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(-1, tokens[:, None], 0.0)


def token_budgeted_batches(lengths: Sequence[int], batch_size: int, max_new_tokens: int) -> list[tuple[int, int]]:
    """``[start, stop)`` batches of prompts sorted longest first (``lengths``): each holds as many prompts as fit
    the token budget of the first batch, ``batch_size`` prompts of the longest length plus ``max_new_tokens``
    (the memory that batch needs), and at least one. Shorter prompts come in larger batches, so that fewer,
    fuller decoding steps do the same work; which prompts share a batch does not change their samples."""
    if not lengths:
        return []
    budget = batch_size * (lengths[0] + max_new_tokens)
    batches, start = [], 0
    while start < len(lengths):
        width = lengths[start] + max_new_tokens  # the longest of the batch, padded to by the others
        stop = start + max(1, min(len(lengths) - start, budget // width))
        batches.append((start, stop))
        start = stop
    return batches


class TransformersBackend(GenerationBackend):
    """``model.generate`` in batches with left padding; runs on CPU or one GPU."""

    name = "transformers"

    def __init__(
        self,
        model_cfg: ModelConfig,
        batch_size: int = 16,
        *,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        from mpo_core.common.models import load_model, load_tokenizer

        self.model_name = model_cfg.name_or_path
        self.batch_size = batch_size
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_cfg, padding_side="left")
        self.tokenizer.padding_side = "left"
        self.model = model if model is not None else load_model(model_cfg)
        self.model.eval()
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def chat_texts(self, conversations: list[list[Message]]) -> list[str]:
        """The conversations rendered by the model's chat template, ending with the assistant prompt."""
        return [
            self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            for conv in conversations
        ]

    def chat(
        self, conversations: list[list[Message]], settings: SamplingSettings, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        reject_empty_prompts(conversation_texts(conversations), self.name)
        return self.complete(self.chat_texts(conversations), settings,
                             content_seeds(settings.seed, conversations) if seeds is None else seeds)

    def complete(
        self, prompts: list[str], settings: SamplingSettings, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        import torch

        reject_empty_prompts(prompts, self.name)
        seeds = content_seeds(settings.seed, prompts) if seeds is None else seeds
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        results: list[list[Completion]] = [[] for _ in prompts]
        eos_ids = self._eos_ids()
        batches = token_budgeted_batches([len(encoded[i]) for i in order], self.batch_size, settings.max_new_tokens)
        with Tracker(len(prompts), desc="generate", unit="prompt") as tracker:
            for start, stop in batches:
                idx = order[start:stop]
                unique = self.tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding=True,
                                            return_tensors="pt").to(self.model.device)
                samplers = [] if settings.greedy else [SeededSampler(
                    [sample_seed(seeds[i], j) for i in idx for j in range(settings.num_samples)],
                    settings.temperature, settings.top_p, self.model.device,
                )]
                with torch.inference_mode(), profile.generating():
                    cache = self._shared_prefill(unique, settings.num_samples)
                    rows = {k: v.repeat_interleave(settings.num_samples, dim=0) for k, v in unique.items()}
                    out = self.model.generate(  # a request's samples adjacent
                        **rows,
                        past_key_values=cache,
                        generation_config=self._generation_config(settings, eos_ids),
                        logits_processor=samplers,
                    )
                new_tokens = out[:, unique["input_ids"].shape[1] :].tolist()
                prompt_tokens = sum(len(encoded[i]) for i in idx)
                profile.add_work("prefill", prompt_tokens, profile.forward_flops(self.parameters, prompt_tokens))
                for row, tokens in enumerate(new_tokens):
                    completion, generated = self._completion(tokens, eos_ids)
                    results[idx[row // settings.num_samples]].append(completion)
                    profile.add_work("decode", generated, profile.forward_flops(self.parameters, generated))
                tracker.update(len(idx))
        return results

    def _shared_prefill(self, unique: dict[str, torch.Tensor], num_samples: int) -> Any:
        """With several samples per prompt, the key-value cache of each prompt but its last token, computed
        once and repeated for each of its samples (``generate`` then runs only the last prompt token per
        sample); None (``generate`` prefills itself) for one sample or a one-token prompt. Positions are
        ``generate``'s own for left padding."""
        if num_samples == 1 or unique["input_ids"].shape[1] < 2:
            return None
        mask = unique["attention_mask"][:, :-1]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = self.model(input_ids=unique["input_ids"][:, :-1], attention_mask=mask, position_ids=positions,
                           use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(num_samples)
        return cache

    def _eos_ids(self) -> set[int]:
        return set(stop_token_ids(self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id))

    def _generation_config(self, settings: SamplingSettings, eos_ids: set[int]) -> Any:
        from transformers import GenerationConfig

        return GenerationConfig(  # greedy: sampling, where asked, is the SeededSampler's
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=sorted(eos_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            do_sample=False,
        )

    def _completion(self, tokens: list[int], eos_ids: set[int]) -> tuple[Completion, int]:
        """The completion of a row's new tokens, and how many of them were generated (EOS included)."""
        stop_at = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        if stop_at is None:
            return Completion(without_cut_character(self.tokenizer.decode(tokens, skip_special_tokens=True)),
                              "length"), len(tokens)
        return Completion(self.tokenizer.decode(tokens[:stop_at], skip_special_tokens=True).strip(),
                          "stop"), stop_at + 1

"""The transformers backend: ``model.generate`` in length-sorted, token-budgeted batches with left padding (CPU
or one GPU). The prompts' prefill runs in groups of similar length (little padding) before ``generate``
decodes the whole batch from their cache; with several samples per prompt it runs once and its cache serves
every sample.

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
    exactly that token. Rows are ``generate``'s (each request's ``num_samples`` rows next to each other).

    The draw is ``torch.multinomial``'s own for one sample (an ``Exp(1)`` variate ``q_v`` per vocabulary entry
    from the row's generator, then ``argmax_v p_v / q_v``), taken over the nucleus only, so a token and the
    generator's state are those of ``multinomial`` on the nucleus-masked probabilities. The nucleus is read
    from the :data:`NUCLEUS_CANDIDATES` most probable tokens (``topk``) and only a row whose nucleus reaches
    past them sorts its whole vocabulary: the same set as a full sort, without one per step."""

    NUCLEUS_CANDIDATES = 256

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device) -> None:
        import torch

        self.temperature, self.top_p = temperature, top_p
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        tokens = []
        for row, (ids, weights), generator in zip(probs, self.nucleus(probs), self.generators):
            noise = torch.empty_like(row).exponential_(1, generator=generator)
            tokens.append(ids[torch.argmax(weights / noise[ids])])
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(-1, torch.stack(tokens)[:, None], 0.0)

    def nucleus(self, probs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row of ``probs``, the nucleus's token ids in ascending order (``argmax`` then breaks ties as
        over the whole vocabulary) and their probabilities: the tokens whose more probable tokens sum to
        less than ``top_p``."""
        import torch

        vocab = probs.shape[-1]
        if self.top_p >= 1.0:
            every = torch.arange(vocab, device=probs.device)
            return [(every, row) for row in probs]
        top, order = probs.topk(min(self.NUCLEUS_CANDIDATES, vocab), dim=-1)
        inside = top.cumsum(dim=-1) - top < self.top_p
        rows = []
        for r in range(probs.shape[0]):
            row_top, row_order, row_inside = top[r], order[r], inside[r]
            if row_inside[-1] and row_top.shape[0] < vocab:  # the nucleus may reach past the candidates
                row_top, row_order = probs[r].sort(descending=True)
                row_inside = row_top.cumsum(dim=-1) - row_top < self.top_p
            ids, ascending = row_order[row_inside].sort()
            rows.append((ids, row_top[row_inside][ascending]))
        return rows


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


PREFILL_PADDING = 0.1  # a prefill group's prompts are padded by at most this share of its longest


def similar_length_groups(lengths: Sequence[int], padding: float = PREFILL_PADDING) -> list[tuple[int, int]]:
    """``[start, stop)`` runs of ``lengths`` (longest first) in which every length is at least
    ``1 - padding`` of the run's first: groups that pad little when each is padded to its own longest."""
    groups, start = [], 0
    for i, length in enumerate(lengths):
        if length < (1 - padding) * lengths[start]:
            groups.append((start, i))
            start = i
    return groups + [(start, len(lengths))] if lengths else []


def _left_padded(states: torch.Tensor, width: int) -> torch.Tensor:
    """``[batch, heads, length, dim]`` keys or values with zeros in front, to ``width`` positions."""
    import torch

    pad = states.new_zeros(*states.shape[:2], width - states.shape[2], states.shape[3])
    return torch.cat([pad, states], dim=2)


class TransformersBackend(GenerationBackend):
    """``model.generate`` in batches with left padding; runs on CPU or one GPU. ``batch_size`` counts
    sequences: a batch of the longest prompts holds ``batch_size // num_samples`` of them."""

    name = "transformers"

    def __init__(
        self,
        model_cfg: ModelConfig,
        batch_size: int = 64,
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
        batches = token_budgeted_batches([len(encoded[i]) for i in order],
                                         max(1, self.batch_size // settings.num_samples), settings.max_new_tokens)
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
                    with profile.prefilling():
                        cache = self._prefill(unique, settings.num_samples)
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

    def _prefill(self, unique: dict[str, torch.Tensor], num_samples: int) -> Any:
        """The key-value cache of each prompt of the batch but its last token (``generate`` then runs only the
        last token of each row), repeated for each of its samples. It is computed in groups of prompts of
        similar length (:func:`similar_length_groups`), each padded only to its own longest, and laid out in
        the batch's left padding (zero keys and values where the mask hides them): the prefill costs about
        its real tokens while decoding runs the whole batch. Positions are ``generate``'s own for left
        padding. None (``generate`` prefills itself) for one-token prompts, or a cache that is not plain
        per-layer keys and values (sliding windows)."""
        import torch

        ids, mask = unique["input_ids"][:, :-1], unique["attention_mask"][:, :-1]
        lengths = mask.sum(dim=1).tolist()
        if not ids.shape[1] or min(lengths) < 1:
            return None
        caches = []
        for start, stop in similar_length_groups(lengths):
            width = max(lengths[start:stop])
            part, part_mask = ids[start:stop, -width:], mask[start:stop, -width:]
            positions = (part_mask.long().cumsum(-1) - 1).masked_fill(part_mask == 0, 0)
            caches.append(self.model(input_ids=part, attention_mask=part_mask, position_ids=positions,
                                     use_cache=True, logits_to_keep=1).past_key_values)
        cache = caches[0]
        if len(caches) > 1:
            if any(type(layer).__name__ != "DynamicLayer" for c in caches for layer in c.layers):
                return None
            for i, layer in enumerate(cache.layers):
                layer.keys, layer.values = (
                    torch.cat([_left_padded(getattr(c.layers[i], kind), ids.shape[1]) for c in caches])
                    for kind in ("keys", "values")
                )
        if num_samples > 1:
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

"""The transformers backend: ``model.generate`` in length-sorted batches with left padding (CPU or one GPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mpo_core.generation.backend import (
    Completion,
    GenerationBackend,
    Message,
    SamplingSettings,
    without_cut_character,
)
from mpo_core.plumbing.config import ModelConfig
from mpo_core.plumbing.progress import Tracker

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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

    def chat_texts(self, conversations: list[list[Message]]) -> list[str]:
        """The conversations rendered by the model's chat template, ending with the assistant prompt."""
        return [
            self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            for conv in conversations
        ]

    def chat(self, conversations: list[list[Message]], settings: SamplingSettings) -> list[list[Completion]]:
        return self.complete(self.chat_texts(conversations), settings)

    def complete(self, prompts: list[str], settings: SamplingSettings) -> list[list[Completion]]:
        import torch

        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        results: list[list[Completion]] = [[] for _ in prompts]
        eos_ids = self._eos_ids()
        with Tracker(len(prompts), desc="generate", unit="prompt") as tracker:
            for batch_index, start in enumerate(range(0, len(order), self.batch_size)):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer.pad(
                    {"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt"
                ).to(self.model.device)
                torch.manual_seed(settings.seed + batch_index)
                with torch.inference_mode():
                    out = self.model.generate(
                        **batch,
                        generation_config=self._generation_config(settings, eos_ids),
                    )
                new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()
                for row, tokens in enumerate(new_tokens):
                    results[idx[row // settings.num_samples]].append(self._completion(tokens, eos_ids))
                tracker.update(len(idx))
        return results

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        ids.add(self.tokenizer.eos_token_id)
        return ids

    def _generation_config(self, settings: SamplingSettings, eos_ids: set[int]) -> Any:
        from transformers import GenerationConfig

        sampling: dict[str, Any] = (
            {"do_sample": False}
            if settings.greedy
            else {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
        )
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            num_return_sequences=settings.num_samples,
            eos_token_id=sorted(eos_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            **sampling,
        )

    def _completion(self, tokens: list[int], eos_ids: set[int]) -> Completion:
        stop_at = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        if stop_at is None:
            return Completion(without_cut_character(self.tokenizer.decode(tokens, skip_special_tokens=True)),
                              "length")
        return Completion(self.tokenizer.decode(tokens[:stop_at], skip_special_tokens=True).strip(), "stop")

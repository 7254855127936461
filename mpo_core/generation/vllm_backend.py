"""The vLLM backend: ``LLM.chat`` / ``LLM.generate`` with ``SamplingParams(n=k, seed=...)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mpo_core.generation.backend import (
    Completion,
    GenerationBackend,
    Message,
    SamplingSettings,
    content_seeds,
)
from mpo_core.plumbing.config import ModelConfig
from mpo_core.plumbing.errors import ModelLoadError


class VLLMBackend(GenerationBackend):
    """vLLM's ``LLM.chat`` / ``LLM.generate`` with ``SamplingParams(n=k, seed=...)`` (the ``gpu`` extra)."""

    name = "vllm"

    def __init__(self, model_cfg: ModelConfig, *, seed: int = 0, **engine_kwargs: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as err:
            raise ModelLoadError(
                "generate.backend 'vllm' needs vLLM on a CUDA machine: pip install 'mpo[gpu]' "
                f"(import failed: {err})"
            ) from err
        from mpo_core.common.models import resolve_model_path

        self.model_name = model_cfg.name_or_path
        self.chat_template = model_cfg.chat_template  # None: the tokenizer's own
        dtype = "auto" if model_cfg.dtype == "auto" else model_cfg.dtype
        self.llm = LLM(
            model=resolve_model_path(model_cfg.name_or_path),
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            dtype=dtype,
            seed=seed,
            **engine_kwargs,
        )

    @staticmethod
    def sampling_params(settings: SamplingSettings, seed: int) -> Any:
        """One request's sampling parameters, ``seed`` its own (:func:`~mpo_core.generation.backend.request_seed`)."""
        from vllm import SamplingParams

        return SamplingParams(
            n=settings.num_samples,
            temperature=settings.temperature,
            top_p=1.0 if settings.greedy else settings.top_p,
            max_tokens=settings.max_new_tokens,
            seed=seed,
        )

    def chat(
        self, conversations: list[list[Message]], settings: SamplingSettings, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        seeds = content_seeds(settings.seed, conversations) if seeds is None else seeds
        outputs = self.llm.chat(
            conversations, [self.sampling_params(settings, seed) for seed in seeds], add_generation_prompt=True,
            chat_template=self.chat_template,
        )
        return [self._completions(o) for o in outputs]

    def complete(
        self, prompts: list[str], settings: SamplingSettings, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        seeds = content_seeds(settings.seed, prompts) if seeds is None else seeds
        tokenizer = self.llm.get_tokenizer()
        token_prompts = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        outputs = self.llm.generate(token_prompts, [self.sampling_params(settings, seed) for seed in seeds])
        return [self._completions(o) for o in outputs]

    @staticmethod
    def _completions(request_output: Any) -> list[Completion]:
        return [
            Completion(o.text.strip(), "length" if o.finish_reason == "length" else "stop")
            for o in request_output.outputs
        ]

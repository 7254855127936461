"""RESPONSES rows from prompts through the configured backend: :func:`generate_responses`."""

from __future__ import annotations

from mpo_core.generation.backend import GenerationBackend, SamplingSettings, request_seed
from mpo_core.generation.transformers_backend import TransformersBackend
from mpo_core.generation.vllm_backend import VLLMBackend
from mpo_core.plumbing.config import GenerateConfig, ModelConfig
from mpo_core.plumbing.errors import InputDataError


def get_backend(model_cfg: ModelConfig, gen_cfg: GenerateConfig) -> GenerationBackend:
    """The backend named by ``gen_cfg.backend`` for ``model_cfg`` (vLLM: a handle on the process's one engine,
    :mod:`mpo_core.generation.vllm_backend`; the stage's :func:`vllm_engine_scope` shuts it down)."""
    if gen_cfg.backend == "vllm":
        return VLLMBackend(model_cfg, gen_cfg.vllm, seed=gen_cfg.seed)
    return TransformersBackend(model_cfg, batch_size=gen_cfg.batch_size)


def generate_responses(
    model_cfg: ModelConfig,
    gen_cfg: GenerateConfig,
    prompts: list[dict],
    *,
    num_samples: int | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    backend: GenerationBackend | None = None,
) -> list[dict]:
    """RESPONSES rows (unlabelled) for prompt dicts with ``prompt_id, lang, text``.

    Keyword arguments override ``gen_cfg``; ``num_samples=1, temperature=0.0`` is greedy. Pass ``backend``
    to reuse a loaded model across calls. Each prompt's samples come from its own seed,
    ``request_seed(gen_cfg.seed, prompt_id, lang)`` (the ``seed`` column), whatever prompts come with it.
    """
    settings = SamplingSettings(
        num_samples=gen_cfg.num_samples if num_samples is None else num_samples,
        max_new_tokens=gen_cfg.max_new_tokens if max_new_tokens is None else max_new_tokens,
        temperature=gen_cfg.temperature if temperature is None else temperature,
        top_p=gen_cfg.top_p,
        seed=gen_cfg.seed,
    )
    empty = [f"{p['prompt_id']}/{p['lang']}" for p in prompts if not str(p["text"]).strip()]
    if empty:
        raise InputDataError(f"{len(empty)} prompt(s) with an empty text (prompt_id/lang): {empty[:10]}")
    backend = backend if backend is not None else get_backend(model_cfg, gen_cfg)
    conversations = [[{"role": "user", "content": p["text"]}] for p in prompts]
    seeds = [request_seed(settings.seed, p["prompt_id"], p["lang"]) for p in prompts]
    completions = backend.chat(conversations, settings, seeds) if prompts else []
    return [
        {
            "prompt_id": p["prompt_id"],
            "lang": p["lang"],
            "sample_idx": sample_idx,
            "prompt": p["text"],
            "text": c.text,
            "finish_reason": c.finish_reason,
            "model": backend.model_name,
            "backend": backend.name,
            "seed": seed,
            "judge": None,
            "verdict": None,
            "score": None,
        }
        for p, seed, samples in zip(prompts, seeds, completions)
        for sample_idx, c in enumerate(samples)
    ]

"""Sampling responses from the model: one small backend interface, transformers (CPU/GPU) and vLLM (GPU).

A backend turns prompts into ``k`` completions each. ``chat`` takes conversations (lists of
``{"role", "content"}`` messages) and applies the model's own chat template with the generation prompt;
``complete`` takes text that is already formatted (the LLM judges build their own prompt formats).

Determinism: the same config on the same backend gives the same samples. The transformers backend sorts
prompts by token length (less padding), cuts them into batches and seeds torch with ``seed + batch_index``
before each batch; vLLM gets ``SamplingParams(seed=seed)`` per request. ``temperature == 0`` is greedy.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpo_core.plumbing.config import GenerateConfig, ModelConfig, PipelineConfig
from mpo_core.plumbing.errors import ConfigError, ModelLoadError
from mpo_core.plumbing.progress import Tracker, round_seconds
from mpo_core.plumbing.stage_run import Artifact, StageRun

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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


def without_cut_character(text: str) -> str:
    """A completion cut at the token limit, stripped, less the U+FFFD its last tokens leave where the cut
    falls inside a multi-byte character (byte-level BPE: Chinese, Bengali...). Left there, the filter would
    drop the pair for encoding damage that generation, not the data, made."""
    return text.rstrip().rstrip("\ufffd").strip()


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
    def sampling_params(settings: SamplingSettings) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=settings.num_samples,
            temperature=settings.temperature,
            top_p=1.0 if settings.greedy else settings.top_p,
            max_tokens=settings.max_new_tokens,
            seed=settings.seed,
        )

    def chat(self, conversations: list[list[Message]], settings: SamplingSettings) -> list[list[Completion]]:
        outputs = self.llm.chat(
            conversations, self.sampling_params(settings), add_generation_prompt=True, chat_template=self.chat_template
        )
        return [self._completions(o) for o in outputs]

    def complete(self, prompts: list[str], settings: SamplingSettings) -> list[list[Completion]]:
        tokenizer = self.llm.get_tokenizer()
        token_prompts = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        outputs = self.llm.generate(token_prompts, self.sampling_params(settings))
        return [self._completions(o) for o in outputs]

    @staticmethod
    def _completions(request_output: Any) -> list[Completion]:
        return [
            Completion(o.text.strip(), "length" if o.finish_reason == "length" else "stop")
            for o in request_output.outputs
        ]


def get_backend(model_cfg: ModelConfig, gen_cfg: GenerateConfig) -> GenerationBackend:
    """The backend named by ``gen_cfg.backend``, loaded with ``model_cfg``."""
    if gen_cfg.backend == "vllm":
        return VLLMBackend(model_cfg, seed=gen_cfg.seed)
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
    to reuse a loaded model across calls.
    """
    settings = SamplingSettings(
        num_samples=gen_cfg.num_samples if num_samples is None else num_samples,
        max_new_tokens=gen_cfg.max_new_tokens if max_new_tokens is None else max_new_tokens,
        temperature=gen_cfg.temperature if temperature is None else temperature,
        top_p=gen_cfg.top_p,
        seed=gen_cfg.seed,
    )
    backend = backend if backend is not None else get_backend(model_cfg, gen_cfg)
    conversations = [[{"role": "user", "content": p["text"]}] for p in prompts]
    completions = backend.chat(conversations, settings) if prompts else []
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
            "seed": settings.seed,
            "judge": None,
            "verdict": None,
            "score": None,
        }
        for p, samples in zip(prompts, completions)
        for sample_idx, c in enumerate(samples)
    ]


def generation_prompts(config: PipelineConfig, translated: list[dict]) -> list[dict]:
    """The prompts the generate stage samples: ``train`` split, dominant + target languages.

    With ``generate.harmful_only`` (default) only harmful prompts: MPO pairs are built from them alone.
    With ``generate.held_out_pairs`` the ``eval`` split too: pairs of those prompts measure reward gaps on
    held-out data and are never trained on (the train stage leaves them out).
    """
    langs = {config.run.dominant_lang, *config.run.target_langs}
    splits = {"train", "eval"} if config.generate.held_out_pairs else {"train"}
    return [
        row for row in translated
        if row["split"] in splits and row["lang"] in langs
        and (row["harmful"] or not config.generate.harmful_only)
    ]


def raw_dominant_responses(config: PipelineConfig, inputs: Container[str], prompts: list[dict]) -> list[dict]:
    """After align (``aligned`` among ``inputs``), ``generate.raw_dominant_samples`` samples per
    dominant-language prompt from the raw model (``config.model``), their ``model`` column the raw model's
    name and their ``sample_idx`` after the policy's own (``generate.num_samples`` on), so that
    (prompt, language, sample) stays a key. The pair stage reads them only for a dominant rejected answer
    where the aligned model never complied (:func:`mpo_core.stages.pair.build_pairs`); [] without align."""
    k = config.generate.raw_dominant_samples
    if k == 0 or "aligned" not in inputs:
        return []
    dominant = [p for p in prompts if p["lang"] == config.run.dominant_lang]
    rows = generate_responses(config.model, config.generate, dominant, num_samples=k)
    for row in rows:
        row["sample_idx"] += config.generate.num_samples
    return rows


def run_generate(stage: StageRun) -> dict[str, Artifact]:
    """Stage ``generate``: ``translated`` PROMPTS -> ``responses`` (k samples per prompt and language)."""
    config = stage.config
    prompts = generation_prompts(config, stage.inputs.table("translated").to_pylist())
    started = time.perf_counter()
    rows = generate_responses(stage.model, config.generate, prompts)
    raw_rows = raw_dominant_responses(config, stage.inputs, prompts)
    rows += raw_rows
    seconds = time.perf_counter() - started
    extra = {
        "prompts": len(prompts),
        "samples": len(rows),
        "seconds": round_seconds(seconds),
        "samples_per_second": round(len(rows) / seconds, 3) if seconds > 0 else None,
        "raw_dominant_samples": len(raw_rows),
    }
    return {"responses": Artifact(rows, extra)}

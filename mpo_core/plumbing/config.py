"""Pipeline configuration: one YAML recipe, validated on load.

Every section is a pydantic model with ``extra="forbid"``: an unknown key, a wrong type or an out-of-range
value is an error that names the file and the dotted key. Each stage reads only its own section; a stage's
identity (see :func:`section_hash`) is the hash of that section, so changing one stage's settings reruns
that stage and what is downstream of it, nothing upstream.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from mpo_core.plumbing.errors import ConfigError, InputDataError
from mpo_core.plumbing.languages import macro_language, normalize_lang, same_language
from mpo_core.plumbing.trainer_arguments import trainer_args_errors

EMBEDDED_DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


class Section(BaseModel):
    """Base of every config section: unknown keys and wrong types are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


RUN_LOCATION_FIELDS = {"name", "root"}
# Fields that say how a stage's work is spread, never what it computes: left out of its identity, so that
# changing them reuses what is done (sharded results equal unsharded ones, mpo_core.plumbing.shards).
# the stages whose config section has a ``shards`` field (shards_field) splitting their rows
SHARDABLE = ("translate", "generate", "label", "evaluate")
EXECUTION_FIELDS = {"run": RUN_LOCATION_FIELDS, **{section: {"shards"} for section in SHARDABLE}}


def shards_field(rows: str) -> Any:
    """The ``shards`` setting of a stage that shards its ``rows`` (:mod:`mpo_core.plumbing.shards`)."""
    return Field(
        default=1, ge=1,
        description=f"Split the stage's {rows} into this many shards, each its own flow run (on the gpu pool "
        "with gpu deployments); the merged output equals an unsharded run's.",
    )


def checked_trainer_args(
    section: type[Section], info: ValidationInfo, trainer_args: dict[str, Any]
) -> dict[str, Any]:
    """``trainer_args`` of ``section`` when its trainer accepts them (:mod:`.trainer_arguments`); else an
    error whose ``entry`` context names the offending key (:func:`_format_errors` adds it to the path)."""
    if not trainer_args:
        return trainer_args
    name, loss_key = ("align", "method") if section is AlignConfig else ("train", "loss")
    loss = info.data.get(loss_key, section.model_fields[loss_key].default)
    errors = trainer_args_errors(loss, trainer_args, name, set(section.model_fields))
    if errors:
        key, why = errors[0]
        raise PydanticCustomError("trainer_args", "{why}", {"why": why, "entry": key or ""})
    return trainer_args


def language_codes(codes: list[str], key: str = "") -> list[str]:
    """``codes`` as the project's codes (``zh-CN`` -> ``zh``, ``chi`` -> ``zh``); an unknown code, or one
    language given twice under two names, is a ``ValueError`` (starting with ``key`` where given)."""
    prefix = f"{key}: " if key else ""
    normalized, seen = [], {}
    for given in codes:
        try:
            code = normalize_lang(given)
        except InputDataError as err:
            raise ValueError(f"{prefix}{err}") from None
        if macro_language(code) in seen:
            raise ValueError(f"{prefix}{given!r} and {seen[macro_language(code)]!r} are the same language")
        seen[macro_language(code)] = given
        normalized.append(code)
    return normalized


class RunConfig(Section):
    """Where a run lives and what it is about."""

    name: str = Field(
        "default",
        description="The run's folder name under run.root (letters, digits, '.', '_', '-').",
    )
    root: str = Field("runs", description="Folder that holds the runs (relative or absolute, no '..').")
    seed: int = Field(
        0,
        description="Seed of the whole run: sampling, splits, align data and (unless train.seed) training.",
    )
    dominant_lang: str = Field(
        "en",
        description="The language whose safety is transferred (usually en); a column of the pairs.",
    )
    target_langs: list[str] = Field(
        default_factory=lambda: ["zh", "ja", "ko", "ar", "bn", "sw"],
        description="The languages MPO makes safe (codes such as zh, ja, ko; aliases like zh-CN accepted).",
    )

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, name: str) -> str:
        """A run name is one plain folder name: no separators, no ``..``, nothing hidden."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name) or ".." in name:
            raise ValueError("run.name must be letters, digits, '.', '_' or '-', not start with '.', no '..'")
        return name

    @field_validator("root")
    @classmethod
    def _root_does_not_climb(cls, root: str) -> str:
        """The runs root may be relative or absolute but never climbs with ``..``."""
        if not root or ".." in Path(root).parts:
            raise ValueError("run.root must be a non-empty path without '..'")
        return root

    @field_validator("dominant_lang")
    @classmethod
    def _dominant_is_a_language(cls, code: str) -> str:
        return language_codes([code])[0]

    @field_validator("target_langs")
    @classmethod
    def _targets_are_other_languages(cls, codes: list[str], info: ValidationInfo) -> list[str]:
        """Known codes, none of them the dominant language under another name (``en-US`` when it is ``en``)."""
        normalized = language_codes(codes)
        dominant = info.data.get("dominant_lang")
        for given, code in zip(codes, normalized):
            if dominant is not None and same_language(code, dominant):
                raise ValueError(f"{given!r} is the dominant language {dominant!r} (run.dominant_lang), not a target")
        return normalized


class RuntimeConfig(Section):
    """How this machine runs the stages and meets faults (threads, free space, a lost Prefect server):
    settings that never change what a stage computes (no stage's identity includes them)."""

    min_free_mb: int = Field(
        default=200, ge=0,
        description="Free space (MB) the run folder's file system must have before a stage starts (else DiskFullError).",
    )
    api_unreachable_s: float = Field(
        default=60.0, gt=0.0,
        description="Seconds an unreachable Prefect API is waited for before the run fails (OrchestrationUnreachableError).",
    )
    threads: int = Field(
        0,
        ge=0,
        description=(
            "torch CPU threads per stage (torch.set_num_threads, and OMP/MKL for the libraries it starts); "
            "0 (default): torch's own, one per core; the default run took 340 s with two threads against 564 s "
            "with one on the idle 2-core machine, every output the same. Set 1 on a machine busy with other "
            "work: there two threads each waiting for a core ran 3-10x slower than one (docs/experiments.md). "
            "$MPO_THREADS, where a launcher sets it (the transfer sweep's lanes, the test suite), wins."
        ),
    )


class ModelConfig(Section):
    """The starting model: the embedded default, a hub id or a local path.

    Weights are read and written as safetensors only; ``trust_remote_code`` stays off unless set here.
    """

    name_or_path: str = Field(
        EMBEDDED_DEFAULT_MODEL,
        description="Starting model: the embedded default, a hub id or a local folder (safetensors only).",
    )
    revision: str | None = Field(
        None,
        description="Hub revision (branch, tag or commit) of name_or_path; None: the default branch.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the model repository's own Python code (off unless you trust it).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights' dtype on load; auto: bfloat16 on a GPU that has it, else float32.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where models run; auto: cuda when available, else cpu.",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template replacing the tokenizer's (reference and train stages alike).",
    )
    truncation: Literal["prompt_left", "llama_factory"] = Field(
        "prompt_left",
        description="How a pair is cut to max_length: mpo's cut or the official code's (llama_factory).",
    )


class PromptsConfig(Section):
    """Ingest: which prompt set becomes the ``prompts`` artifact.

    ``source`` is ``seed``, a local file, or ``hf://<owner>/<dataset>/<file>`` (online users). The column
    names apply to plain Parquet/CSV/JSONL sets; ``split_eval_fraction`` of the prompt ids (stable hash) go
    to ``eval`` where the source has no split; ``limit`` keeps the first N prompt ids (all languages),
    taken in turn from harmful and benign prompts.
    """

    source: str = Field(
        "seed",
        description="Prompt set: seed (packaged), a local file, or hf://<owner>/<dataset>/<file>.",
    )
    format: Literal["auto", "seed", "parquet", "csv", "jsonl", "multijail", "mpo_json", "hh_rlhf"] = Field(
        "auto",
        description="Format of source; auto guesses it from the name and content.",
    )
    langs: list[str] | None = Field(
        None,
        description="Languages to keep from the source; None: the run's dominant and target languages.",
    )
    limit: int | None = Field(
        default=None, ge=1,
        description="Keep the first N prompt ids (all their languages), alternating harmful and benign.",
    )
    text_column: str = Field("text", description="Column of the prompt text in plain Parquet/CSV/JSONL sets.")
    lang_column: str = Field(
        "lang",
        description="Column of the language code in plain Parquet/CSV/JSONL sets.",
    )
    id_column: str = Field(
        "prompt_id",
        description="Column of the prompt id (shared by a prompt's translations) in plain sets.",
    )
    split_eval_fraction: float = Field(
        default=0.2, ge=0.0, le=1.0,
        description="Share of prompt ids (stable hash) put in the eval split where the source has none.",
    )
    default_harmful: bool = Field(
        True,
        description="Whether a prompt without a harmful flag counts as harmful.",
    )


class TranslateConfig(Section):
    """How prompts reach the target languages: already there, the LLM, or an MT model."""

    backend: Literal["provided", "llm", "seq2seq"] = Field(
        "provided",
        description="provided: the set has translations; llm: the model translates; seq2seq: an MT model.",
    )
    model: str | None = Field(
        None,
        description="seq2seq: the MT model id (required); llm: the LLM (None: the run's model).",
    )
    batch_size: int = Field(default=8, ge=1, description="Prompts translated per batch.")
    max_new_tokens: int = Field(default=256, ge=1, description="Longest translation, in tokens.")
    shards: int = shards_field("prompts")


class VLLMConfig(Section):
    """The vLLM engine (``backend: vllm`` anywhere): one per stage process, started on first use and shut down
    when the stage ends. The weights' dtype is ``model.dtype`` (auto: bfloat16 on a GPU that has it, float32
    on CPU, as the transformers backend)."""

    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one model is split across.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0,
        description="GPU: share of GPU memory the engine may take (weights + KV cache).",
    )
    max_model_len: int | None = Field(
        default=2048, ge=16,
        description="Longest prompt + response in tokens (sizes the KV cache); None: the model's own.",
    )
    enforce_eager: bool = Field(
        True,
        description="Skip graph compilation/capture: faster start (CPU: ~40 s vs 120-190 s), same speed on CPU.",
    )
    cpu_kvcache_space_gib: int = Field(
        default=2, ge=1,
        description="CPU build: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE); unused on GPU.",
    )
    cpu_reserved_cores: int = Field(
        default=0, ge=0,
        description="CPU build: cores kept from inference threads (VLLM_CPU_NUM_OF_RESERVED_CPU).",
    )


class GenerateConfig(Section):
    """Sampling k responses per prompt per language."""

    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="Generation backend: transformers or vllm (CPU build or GPU; settings in generate.vllm).",
    )
    vllm: VLLMConfig = Field(
        default_factory=VLLMConfig,
        description="The vLLM engine's settings, for every stage that runs a model through vllm.",
    )
    num_samples: int = Field(default=2, ge=1, description="Responses sampled per prompt per language (k).")
    max_new_tokens: int = Field(default=48, ge=1, description="Longest response, in tokens.")
    temperature: float = Field(default=0.8, ge=0.0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(
        default=0.95, gt=0.0, le=1.0,
        description="Nucleus sampling: smallest token set with this total probability.",
    )
    batch_size: int = Field(
        default=64,
        ge=1,
        description=(
            "Sequences (prompts x samples) per generation batch of the longest prompts; shorter prompts come "
            "in larger batches of the same token budget (batch_size x (longest prompt + max_new_tokens))."
        ),
    )
    seed: int = Field(0, description="Sampling seed.")
    harmful_only: bool = Field(
        True,
        description="Pairs are built from harmful prompts only; benign ones are for evaluation.",
    )
    held_out_pairs: bool = Field(
        False,
        description="Also sample eval-split prompts: their pairs measure RG, never train.",
    )
    raw_dominant_samples: int = Field(
        default=0, ge=0,
        description="After align: samples per dominant prompt from the raw model (rejected answers).",
    )
    shards: int = shards_field("prompts")


class LabelConfig(Section):
    """Which judge labels responses."""

    judge: Literal["refusal_patterns", "llama_guard_3", "qwen3guard"] = Field(
        "refusal_patterns",
        description="Judge: offline refusal_patterns, or the LLM judges llama_guard_3 / qwen3guard.",
    )
    model: str | None = Field(
        None,
        description="LLM judge: a hub id or path; None: the official 8B checkpoint.",
    )
    batch_size: int = Field(default=8, ge=1, description="Responses judged per batch (LLM judges).")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="How LLM judges run: transformers or vllm (engine settings: generate.vllm).",
    )
    patterns: str | None = Field(
        None,
        description="refusal_patterns: a pattern file replacing the packaged one.",
    )
    shards: int = shards_field("responses")


class PairConfig(Section):
    """Building MPO quadruples from judged samples (or reading ready-made ones), then optional label noise:
    ``target_noise`` of the target pairs per language get chosen and rejected swapped (seed ``noise_seed``,
    the dominant side untouched; see :mod:`mpo_core.common.label_noise`)."""

    fallback_refusal: bool = Field(
        True,
        description="No safe sample: use the language's configured refusal as chosen, else skip the pair.",
    )
    fallback_texts: dict[str, str] = Field(
        default_factory=dict,
        description="Per-language refusal texts overriding the packaged fallback refusals.",
    )
    source: str | None = Field(
        None,
        description="Ready-made quadruples (mpo_official JSON, HH-RLHF...): skip building pairs.",
    )
    source_format: Literal["auto", "mpo_json", "hh_rlhf"] = Field(
        "auto",
        description="Format of source (read by mpo_core.readers.pairs.load_pairs); auto guesses it.",
    )
    target_noise: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Share of target pairs per language with chosen and rejected swapped (label noise).",
    )
    noise_seed: int = Field(0, description="Which pairs target_noise flips (mpo_core.common.label_noise).")
    chosen_in_language: bool = Field(
        False,
        description="Never choose a safe sample that language id reads as another language than its prompt.",
    )


TruncatedField = Literal["dominant_chosen", "dominant_rejected", "target_chosen", "target_rejected"]


class FilterConfig(Section):
    """Noisy-pair filter thresholds (defaults chosen from the official MPO data; see mpo_core/stages/filter.py).

    ``truncated_fields`` is empty by default: the official files are cut at a generation cap almost
    everywhere (llama target answers ~88%, gemma English chosen ~73%) and so is the embedded default's own
    48-token generation; list fields here to drop texts that end mid-word.
    """

    langid_enabled: bool = Field(
        True,
        description="Check that every text is in its pair's language (wrong_language drops).",
    )
    langid_min_confidence: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Language id confidence needed to call a text another language.",
    )
    langid_max_chars: int = Field(
        default=120, ge=16,
        description="Characters of a text that language id reads.",
    )
    langid_quick_chars: int = Field(
        default=64, ge=8,
        description="Characters of a first look that settles texts read as the expected language.",
    )
    langid_fallback_below: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="fastText confidence below which py3langid is asked too.",
    )
    langid_processes: int = Field(
        default=2, ge=1,
        description="Processes sharing language identification (this one included).",
    )
    langid_parallel_min_rows: int = Field(
        default=2000, ge=1,
        description="Fewest rows in a batch before identification runs in parallel.",
    )
    langid_worker_share: float = Field(
        default=0.7, gt=0.0, lt=1.0,
        description="Starting share of a batch's identification given to the worker process.",
    )
    max_length_ratio: float = Field(
        default=20.0, gt=1.0,
        description="Drop a target text over this many times longer or shorter than its dominant one.",
    )
    truncated_fields: list[TruncatedField] = Field(
        default_factory=list,
        description="Texts dropped when they end mid-word (empty: none; generation caps cut most).",
    )
    truncated_min_chars: int = Field(
        default=200, ge=1,
        description="Shortest text that counts as cut off when it ends mid-word.",
    )
    judge_min_chosen_score: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Drop a pair whose chosen response the judge scores below this.",
    )
    judge_max_rejected_score: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Drop a pair whose rejected response the judge scores above this.",
    )
    batch_size: int = Field(default=8192, ge=1, description="Pairs per filter batch.")


class LoraSettings(Section):
    """LoRA through peft; ``None`` in :class:`TrainConfig` means full fine-tuning."""

    r: int = Field(default=16, ge=1, description="LoRA rank.")
    alpha: int = Field(default=32, ge=1, description="LoRA scaling alpha.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branches.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Modules given adapters: all-linear or a list of module names.",
    )


class ReferenceConfig(Section):
    """The frozen reference pass over the dominant-language side of every pair."""

    batch_size: int = Field(default=8, ge=1, description="Pairs per reference forward batch.")
    max_length: int = Field(
        default=1024, ge=8,
        description="Longest encoded sequence (prompt + response), in tokens; train must match it.",
    )
    min_safe_share: float = Field(
        default=0.6, ge=0.0, le=1.0,
        description="MPO's premise: least share of training pairs with RG^d > 0, else training refuses.",
    )
    drop_unsafe_pairs: bool = Field(
        False,
        description="Train without the pairs whose RG^d <= 0 (written down as dropped).",
    )


class TrainConfig(Section):
    """Training with the MPO loss or a baseline on the same data (paper settings as defaults)."""

    loss: Literal["mpo", "dpo", "simpo", "ipo", "sft"] = Field(
        "mpo",
        description="Objective: mpo, or a baseline on the same pairs (dpo, simpo, ipo, sft on chosen).",
    )
    beta: float = Field(
        default=1.0, gt=0.0,
        description="MPO: weight of RG^t in L1; dpo/ipo/simpo: their beta.",
    )
    lam: float = Field(default=1.0, ge=0.0, description="MPO: weight lambda of the hidden-state loss L2.")
    learning_rate: float = Field(default=6e-7, gt=0.0, description="Peak learning rate.")
    num_epochs: float = Field(
        default=2.0, gt=0.0,
        description="Epochs over the training pairs (ignored when max_steps > 0).",
    )
    max_steps: int = Field(-1, description="Optimizer steps to train; -1: num_epochs decides.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine",
        description="Learning-rate schedule.",
    )
    warmup_ratio: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="Share of the steps spent warming the learning rate up.",
    )
    per_device_batch_size: int = Field(default=1, ge=1, description="Pairs per device per micro-batch.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1,
        description="Micro-batches accumulated per optimizer step.",
    )
    max_length: int = Field(
        default=1024, ge=8,
        description="Longest encoded sequence (prompt + response), in tokens.",
    )
    bf16: bool = Field(
        False,
        description="Compute in bf16 (weights stay as loaded; fp32 master weights under sharding).",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in backward to save memory.",
    )
    lora: LoraSettings | None = Field(
        None,
        description="LoRA adapters through peft (merged on save); None: full fine-tuning.",
    )
    save_steps: int = Field(default=50, ge=1, description="Steps between resume checkpoints.")
    save_total_limit: int = Field(default=2, ge=1, description="Resume checkpoints kept.")
    logging_steps: int = Field(
        default=1, ge=1,
        description="Steps between logged metrics (loss, L1, L2, gaps per language).",
    )
    simpo_gamma: float = Field(default=0.5, ge=0.0, description="SimPO's target reward margin gamma.")
    # fsdp2: parameters, gradients and AdamW states sharded over the processes of `accelerate launch` /
    # torchrun (torch fully_shard through accelerate), fp32 master weights (accelerate upcasts bf16 weights)
    # with bf16 compute where train.bf16 is on; a single process without a launcher trains unsharded
    sharding: Literal["none", "fsdp2"] = Field(
        "none",
        description="fsdp2: shard weights, gradients and optimizer states over launched processes.",
    )
    seed: int | None = Field(
        None,
        description="Training's own seed (data order); None: run.seed. Sweeps vary it alone.",
    )
    sft_weight: float = Field(
        default=0.0, ge=0.0,
        description="dpo/ipo: + sft_weight x the NLL of the chosen answers (TRL's sft loss term).",
    )
    trainer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="TrainingArguments / TRL config fields passed to the trainer over mpo's defaults.",
    )

    @field_validator("trainer_args")
    @classmethod
    def _trainer_accepts(cls, trainer_args: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return checked_trainer_args(cls, info, trainer_args)


class EvaluateConfig(Section):
    """Evaluation sets and metrics (base and trained model side by side, greedy decoding).

    ``safety_sets``: ``seed`` (the seed hold-out, split ``eval``, from the ``translated`` artifact), a
    MultiJail-style CSV, any prompt-set path, or a hub id (``DAMO-NLP-SG/MultiJail``) read by the ingest
    loader. ``langs`` ``None`` means the run's dominant and target languages. ``pairs`` is a held-out pair
    file in any format ``mpo_core.readers.pairs.load_pairs`` reads; ``None`` uses the ``filtered`` pairs. ``mgsm``
    and ``multiple_choice`` (utility) are off when empty: MGSM is a folder of ``mgsm_<lang>.tsv``, one such
    file, or the hub id ``juletxara/mgsm``; multiple choice is M-MMLU-style CSV/JSONL files.
    """

    safety_sets: list[str] = Field(
        default_factory=lambda: ["seed"],
        description="Safety prompt sets: seed, a MultiJail-style CSV, a prompt-set path or a hub id.",
    )
    langs: list[str] | None = Field(
        None,
        description="Languages evaluated; None: the run's dominant and target languages.",
    )
    max_prompts_per_lang: int | None = Field(
        default=None, ge=1,
        description="Safety prompts per language (the same first prompts in every language); None: all.",
    )
    max_new_tokens: int = Field(
        default=48, ge=1,
        description="Longest greedy answer to a safety prompt, in tokens.",
    )
    bootstrap_samples: int = Field(
        default=1000, ge=10,
        description="Bootstrap resamples behind every interval.",
    )
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0, description="Confidence level of the intervals.")
    pairs: str | None = Field(
        None,
        description="Held-out pair file measuring the reward gap; None: the run's filtered pairs.",
    )
    max_pairs_per_lang: int | None = Field(
        default=64, ge=1,
        description="Pairs per language for the reward gap; None: all.",
    )
    batch_size: int = Field(default=8, ge=1, description="Sequences per evaluation batch.")
    max_length: int = Field(default=512, ge=8, description="Longest encoded pair sequence, in tokens.")
    mgsm: list[str] = Field(
        default_factory=list,
        description="MGSM sets (a folder of mgsm_<lang>.tsv, one file, or juletxara/mgsm); empty: off.",
    )
    mgsm_max_per_lang: int | None = Field(
        default=50, ge=1,
        description="MGSM questions per language; None: all.",
    )
    mgsm_max_new_tokens: int = Field(default=256, ge=1, description="Longest MGSM answer, in tokens.")
    multiple_choice: list[str] = Field(
        default_factory=list,
        description="Multiple-choice utility files (M-MMLU-style CSV/JSONL); empty: off.",
    )
    mc_max_per_lang: int | None = Field(
        default=100, ge=1,
        description="Multiple-choice questions per language; None: all.",
    )
    roles: list[str] | None = Field(
        None,
        description="Models evaluated (raw, base, trained); None: all the run has.",
    )
    shards: int = shards_field("greedy generations (every model's answers to the safety and MGSM prompts)")


class AlignConfig(Section):
    """The optional ``align`` stage: make the dominant language safe before anything else (see mpo_core/stages/align.py).

    Trains on dominant-language ``train``-split prompts only: harmful ones answered with a varied refusal,
    benign ones with the starting model's own greedy answer (``sft``); ``dpo`` also makes preference pairs
    (harmful: refusal over the model's answer; benign: the model's answer over a refusal). ``prompts``:
    ``run`` takes the run's prompts, ``seed`` every train-split prompt of the packaged seed set.
    ``refusals``: a file of refusals, one a line, or ``None`` for the packaged set. ``extra_pairs``: more
    harmful dominant-language prompts with a real safe and unsafe answer from an MPO-format file.
    """

    enabled: bool = Field(False, description="Run the align stage: make the dominant language safe first.")
    method: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft on refusals and own answers, or dpo on preference pairs.",
    )
    prompts: Literal["run", "seed"] = Field(
        "run",
        description="Align prompts: run (the run's train split) or seed (the packaged seed set's).",
    )
    refusals: str | None = Field(
        None,
        description="File of refusals, one a line (or HH-RLHF JSONL); None: the packaged set.",
    )
    extra_pairs: str | None = Field(
        None,
        description="MPO-format JSON (mpo_official): its dominant-side pairs (prompt, source_chosen over "
        "source_rejected) join align's data; prompts equal to a seed or MultiJail prompt are dropped. None: none.",
    )
    max_extra_pairs: int | None = Field(default=None, ge=1, description="Most extra pairs used; None: all.")
    max_harmful: int | None = Field(default=None, ge=1, description="Most harmful prompts used; None: all.")
    max_benign: int | None = Field(default=None, ge=1, description="Most benign prompts used; None: all.")
    answer_max_new_tokens: int = Field(
        default=48, ge=1,
        description="Longest own answer generated for a benign prompt, in tokens.",
    )
    beta: float = Field(default=0.1, gt=0.0, description="dpo only: DPO's beta.")
    learning_rate: float = Field(
        default=2e-5, gt=0.0,
        description="Peak learning rate (cosine schedule, warmup 0.1).",
    )
    num_epochs: float = Field(
        default=1.0, gt=0.0,
        description="Epochs over the align rows (ignored when max_steps > 0).",
    )
    max_steps: int = Field(-1, description="Optimizer steps; -1: num_epochs decides.")
    per_device_batch_size: int = Field(default=8, ge=1, description="Rows per device per batch.")
    max_length: int = Field(default=256, ge=8, description="Longest encoded sequence, in tokens.")
    save_steps: int = Field(default=50, ge=1, description="Steps between resume checkpoints.")
    sft_weight: float = Field(
        default=0.0, ge=0.0,
        description="dpo only: + sft_weight x NLL of the chosen answer.",
    )
    trainer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="TrainingArguments / TRL config fields passed to the align trainer over mpo's defaults.",
    )

    @field_validator("trainer_args")
    @classmethod
    def _trainer_accepts(cls, trainer_args: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return checked_trainer_args(cls, info, trainer_args)


class PipelineConfig(Section):
    """A whole recipe: one section per stage."""

    run: RunConfig = Field(default_factory=RunConfig, description="Where the run lives and what it is about.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The starting model.")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Ingest: the prompt set.")
    translate: TranslateConfig = Field(
        default_factory=TranslateConfig,
        description="How prompts reach the target languages.",
    )
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Sampling responses.")
    label: LabelConfig = Field(default_factory=LabelConfig, description="The judge of responses.")
    pair: PairConfig = Field(default_factory=PairConfig, description="Building MPO quadruples.")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="Noisy-pair filter.")
    reference: ReferenceConfig = Field(
        default_factory=ReferenceConfig,
        description="The frozen reference pass.",
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training (MPO or a baseline).")
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig,
        description="Evaluation sets and metrics.",
    )
    align: AlignConfig = Field(default_factory=AlignConfig, description="The optional align stage.")
    runtime: RuntimeConfig = Field(
        default_factory=RuntimeConfig,
        description="How this machine runs the stages: threads, free space asked for, a lost Prefect server's grace.",
    )

    @field_validator("run")
    @classmethod
    def _dominant_not_a_target(cls, run: RunConfig) -> RunConfig:
        if run.dominant_lang in run.target_langs:
            raise ValueError(f"dominant_lang {run.dominant_lang!r} is also listed in target_langs")
        return run

    @field_validator("prompts", "evaluate")
    @classmethod
    def _known_languages(cls, section: PromptsConfig | EvaluateConfig, info: ValidationInfo):
        if section.langs is None:
            return section
        return section.model_copy(update={"langs": language_codes(section.langs, f"{info.field_name}.langs")})

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


class RecipeLoader(yaml.SafeLoader):
    """YAML with the YAML 1.2 core schema's plain scalars, and no key given twice in one mapping.

    PyYAML follows YAML 1.1, where ``1e-5`` is a string, ``2024-01-01`` a date and ``yes``/``on`` booleans;
    here, as in YAML 1.2, ``1e-5`` is a float, ``2024-01-01`` and ``yes`` stay strings, and only
    ``true``/``false`` are booleans and ``null``/``~``/nothing is null.
    """

    origin = "<yaml>"


class RecipeDumper(yaml.SafeDumper):
    """Writes what :class:`RecipeLoader` reads back unchanged (quotes ``'1e5'`` as a string, not ``'yes'``)."""


RecipeLoader.yaml_implicit_resolvers = {}
RecipeDumper.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     list("-+.0123456789")),
):
    for _cls in (RecipeLoader, RecipeDumper):
        _cls.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _construct_yaml12_int(loader: RecipeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0) if text[:2] in ("0o", "0x") else int(text)


def _construct_unique_mapping(loader: RecipeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are all different; a key given twice is an error naming both lines."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, Hashable):
            continue  # PyYAML's own check below names the unhashable key
        if key in seen:
            raise ConfigError(
                f"{loader.origin}: key {key!r} is given twice in one mapping (lines {seen[key]} and {line})"
            )
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


RecipeLoader.add_constructor("tag:yaml.org,2002:int", _construct_yaml12_int)
RecipeLoader.construct_mapping = _construct_unique_mapping


def read_yaml(text: str, origin: str = "<yaml>") -> Any:
    """``text`` parsed by :class:`RecipeLoader`; errors name ``origin``."""
    loader = RecipeLoader(text)
    loader.origin = origin
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path, given = [str(p) for p in e["loc"]], e.get("input")
        if key := e.get("ctx", {}).get("entry"):  # an error about one entry of a mapping (trainer_args)
            path, given = [*path, key], given.get(key)
        lines.append(f"  {'.'.join(path) or '<root>'}: {e['msg']} (got {given!r})")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], origin: str = "<dict>") -> PipelineConfig:
    """Validate a plain mapping into a :class:`PipelineConfig`; errors name ``origin`` and the key."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config {origin}:\n{_format_errors(err)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML recipe (default: ``configs/default.yaml``) and apply ``key.sub=value`` overrides.

    Override values are parsed as YAML scalars (``train.beta=1.5``, ``run.target_langs=[zh,ko]``) with the
    recipe's rules (:func:`read_yaml`).
    """
    path = Path(path) if path is not None else CONFIGS_DIR / "default.yaml"
    try:
        data = read_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    for item in overrides or []:
        apply_override(data, item)
    return config_from_dict(data, origin=str(path))


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested mapping in place (value parsed by :func:`read_yaml`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    try:
        node[leaf] = read_yaml(raw, f"override {item!r}")
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from None


def canonical_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of ``obj`` (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def section_hash(config: PipelineConfig, *sections: str) -> str:
    """Hash of the named sections of ``config``: the config part of a stage's identity. A name may also be
    one field of a section (``reference.min_safe_share``), for a stage that reads only that field. Where a
    run lives (``run.name``, ``run.root``) and how a stage's work is spread (``EXECUTION_FIELDS``) never
    change what a stage computes, so they are left out."""
    dumps = {}
    for name in sections:
        section, _, field = name.partition(".")
        value = getattr(config, section)
        if field:
            dumps[name] = getattr(value, field)
            continue
        dumps[name] = value.model_dump(mode="json", exclude=EXECUTION_FIELDS.get(name))
    return canonical_hash(dumps)


def dump_config(config: PipelineConfig) -> str:
    """The config as YAML (what a run records beside its artifacts)."""
    return yaml.dump(config.model_dump(mode="json"), Dumper=RecipeDumper, sort_keys=False, allow_unicode=True)

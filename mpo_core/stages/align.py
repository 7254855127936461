"""Stage ``align`` (optional): make the dominant language safe before MPO transfers its safety.

The data (train-split dominant prompts: harmful ones answered with a refusal, benign ones with the model's
own answer; optionally extra pairs) is built by :mod:`mpo_core.training.align_data`; training, checkpoints
and resume are :func:`mpo_core.training.fit.fit`'s. Output ``aligned``: a checkpoint folder, the model of
generate, reference, train and the evaluation's ``base``. The training rows are kept beside it
(``align_data.jsonl``) and summarised in its ``mpo_train.json`` (``align`` key), which the report shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from mpo_core.generation.vllm_backend import vllm_engine_scope
from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.seed import seed_path
from mpo_core.plumbing.stage_run import Artifact, StageRun
from mpo_core.training.align_data import (
    PACKAGED_REFUSALS,
    align_prompts,
    align_train_config,
    build_align_rows,
    extra_align_rows,
    input_file,
    load_refusals,
    local_safety_sets,
    own_answers,
    refusal_check,
)
from mpo_core.training.fit import fit

ALIGN_DATA = "align_data.jsonl"


def _refusal_source(config: PipelineConfig) -> Path:
    return input_file("align.refusals", config.align.refusals) if config.align.refusals else PACKAGED_REFUSALS


def external_align_files(config: PipelineConfig) -> dict[str, Path]:
    """Files outside the run that the align stage reads (their hashes join its identity)."""
    files = {"refusals": _refusal_source(config)}
    if config.align.prompts == "seed" or config.align.extra_pairs:  # extra pairs: its prompts are kept out
        files["seed"] = seed_path()
    if config.align.extra_pairs:
        files["extra_pairs"] = input_file("align.extra_pairs", config.align.extra_pairs)
        files.update({f"evaluation:{source}": Path(source) for source in local_safety_sets(config)})
    return files


def run_align(stage: StageRun) -> dict[str, Artifact]:
    """Stage ``align``: ``translated`` -> ``aligned`` (a checkpoint folder), resumable like training."""
    config, out_dir = stage.config, stage.out_dir
    harmful, benign = align_prompts(config, stage.inputs.table("translated"))
    answer_prompts = benign + (harmful if config.align.method == "dpo" else [])
    with vllm_engine_scope():  # the engine is gone before training starts
        answers = own_answers(config, answer_prompts)
    is_refusal = refusal_check(config.run.dominant_lang)
    rows, counts = build_align_rows(
        harmful, benign, answers, load_refusals(_refusal_source(config)), config.align.method,
        is_refusal=is_refusal, seed=config.run.seed,
    )
    extra_rows, extra_counts = extra_align_rows(config, is_refusal)
    rows += extra_rows
    with open(out_dir / ALIGN_DATA, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    table = pa.Table.from_pylist(rows)
    record = {
        "method": config.align.method,
        "prompts": config.align.prompts,
        "refusals": str(_refusal_source(config).name),
        "rows": counts,
        **({"extra_pairs": {"file": Path(config.align.extra_pairs).name, **extra_counts}} if extra_counts else {}),
        "learning_rate": config.align.learning_rate,
        "max_steps": config.align.max_steps,
        "batch_size": config.align.per_device_batch_size,
        **({"beta": config.align.beta, "sft_weight": config.align.sft_weight} if config.align.method == "dpo" else {}),
    }
    fit(align_train_config(config), config.model, table, None, out_dir,
        {"inputs": stage.input_hashes, "align": record})
    return {}



"""The ``align`` recipe's data: make the dominant language safe before MPO transfers its safety.

MPO assumes the reference already prefers the safe answer in the dominant language (RG^d > 0, see
:mod:`mpo_core.method.premise`). The embedded default does not, so its recipe first aligns the dominant language:

- data: dominant-language prompts of the ``train`` split only (never the evaluation hold-out): the run's
  ``translated`` prompts (``align.prompts: run``) or every train-split prompt of the packaged seed set
  (``seed``). Harmful prompts get a refusal drawn (seeded) from a varied set: the packaged
  ``data/refusals_en.txt``, a text file of one refusal a line, or HH-RLHF dialogues (``.jsonl``/``.jsonl.gz``,
  the final assistant turns of ``chosen`` that the refusal-pattern judge calls refusals). Benign prompts get
  the starting model's own greedy answer, so helpfulness is kept; an answer that is itself a refusal is
  left out (it would teach refusing benign prompts).
- ``align.extra_pairs``: more harmful dominant-language prompts from an MPO-format file (the paper's
  ``mpo_official`` quadruples, deduplicated by dominant prompt): its real safe answer ``source_chosen`` over
  its real unsafe one ``source_rejected`` (an off-policy pair, but a real unsafe answer the model's own would
  only approximate, and no generation time). A prompt equal (case and spaces aside) to a seed prompt or a
  prompt of a local ``evaluate.safety_sets`` file is dropped, counted in the record.
- ``align.method: sft``: supervised fine-tuning on (prompt, target) through the project's trainer (TRL SFT,
  completion-only loss). ``dpo``: TRL DPO on preference pairs, harmful: refusal over the model's own
  answer; benign: the model's answer over a refusal (against over-refusal).

The training config is the ``align`` section read as a ``train`` section (:func:`align_train_config`);
the align stage fits it with :func:`mpo_core.training.fit.fit`.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from mpo_core.common import verdicts
from mpo_core.generation.responses import generate_responses
from mpo_core.judges.patterns import RefusalPatternJudge
from mpo_core.plumbing.config import PipelineConfig, TrainConfig
from mpo_core.plumbing.errors import InputDataError
from mpo_core.plumbing.seed import load_seed_prompts
from mpo_core.readers.pairs import read_mpo_json
from mpo_core.readers.prompts import ingest_prompt_set

PACKAGED_REFUSALS = Path(__file__).resolve().parents[1] / "data" / "refusals_en.txt"


HH_MAX_REFUSAL_CHARS = 300


def input_file(setting: str, path: str | Path) -> Path:
    """``path`` when it is a file, else an :class:`InputDataError` naming the setting (raised before the stage
    hashes its inputs, so nothing is written)."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{setting}: {path} is not a file")
    return path


def local_safety_sets(config: PipelineConfig) -> list[str]:
    return [s for s in config.evaluate.safety_sets if s != "seed" and Path(s).is_file()]


def normalized_prompt(text: str) -> str:
    """``text`` case-folded with runs of white space made one space: the key two prompts are equal on."""
    return " ".join(text.split()).casefold()


def evaluation_prompt_texts(config: PipelineConfig, sources: list[str | Path] = ()) -> set[str]:
    """Normalised dominant-language texts of every prompt align must never train on: the packaged seed set
    (all splits), the local files of ``evaluate.safety_sets`` and ``sources`` (e.g. MultiJail's CSV)."""
    lang = config.run.dominant_lang
    rows = load_seed_prompts()
    for source in [*local_safety_sets(config), *map(str, sources)]:
        rows += ingest_prompt_set(config, source)
    return {normalized_prompt(r["text"]) for r in rows if r["lang"] == lang}


def load_extra_pairs(
    path: str | Path, excluded: set[str], *, is_refusal: Any, limit: int | None = None
) -> tuple[list[dict], dict[str, int]]:
    """Align rows (``kind`` ``extra``) from the dominant side of an MPO-format file, and their counts.

    One row per distinct dominant prompt: ``source_chosen`` over ``source_rejected``. Dropped and counted: a
    prompt whose normalised text is in ``excluded`` (an evaluation prompt) and a pair whose rejected answer
    itself refuses (nothing to prefer). At most ``limit`` rows, in file order. A malformed file is an
    :class:`InputDataError` naming file, field and row (:func:`mpo_core.readers.pairs.read_mpo_json`).
    """
    quadruples = read_mpo_json(input_file("align.extra_pairs", path))
    unique = list({q["dominant_prompt"]: q for q in reversed(quadruples)}.values())[::-1]
    rows, counts = [], {"file_prompts": len(unique), "evaluation_overlap_dropped": 0, "rejected_refused": 0}
    for pair in unique:
        if limit is not None and len(rows) >= limit:
            break
        if normalized_prompt(pair["dominant_prompt"]) in excluded:
            counts["evaluation_overlap_dropped"] += 1
        elif not pair["dominant_rejected"].strip() or is_refusal(pair["dominant_rejected"]):
            counts["rejected_refused"] += 1
        else:
            rows.append({"kind": "extra", "target_prompt": pair["dominant_prompt"],
                         "target_chosen": pair["dominant_chosen"], "target_rejected": pair["dominant_rejected"]})
    counts["extra"] = len(rows)
    return rows, counts


def refusal_check(lang: str) -> Callable[[str], bool]:
    """Whether a ``lang`` text is a refusal by the refusal-pattern judge: what align keeps as a refusal and
    keeps out as a benign or unsafe answer."""
    judge = RefusalPatternJudge()
    return lambda text: verdicts.is_refusal(judge.judge_one(text, lang).verdict)


def _last_assistant_turn(dialogue: str) -> str:
    return dialogue.rsplit("\n\nAssistant:", 1)[-1].strip()


def load_refusals(path: str | Path | None = None) -> list[str]:
    """Distinct refusals from a text file (one a line) or HH-RLHF dialogues (``.jsonl``/``.jsonl.gz``)."""
    path = input_file("align.refusals", path or PACKAGED_REFUSALS)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        refuses = refusal_check("en")
        opener = gzip.open if path.suffix == ".gz" else open
        texts = []
        with opener(path, "rt", encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                try:
                    chosen = json.loads(line)["chosen"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InputDataError(f"{path}: line {line_no}: expected a JSON object with 'chosen'") from None
                answer = re.sub(r"\s+", " ", _last_assistant_turn(chosen))
                if "Human:" in answer or not 0 < len(answer) <= HH_MAX_REFUSAL_CHARS:
                    continue  # a dialogue ending on the human's turn, or a long answer
                if refuses(answer):
                    texts.append(answer)
    else:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    refusals = list(dict.fromkeys(t for t in texts if t))
    if not refusals:
        raise InputDataError(f"align.refusals: {path} holds no refusal")
    return refusals


def align_prompts(config: PipelineConfig, translated: pa.Table) -> tuple[list[dict], list[dict]]:
    """(harmful, benign) dominant-language ``train``-split prompts, at most ``max_harmful``/``max_benign``."""
    cfg = config.align
    if cfg.prompts == "seed":
        rows = load_seed_prompts()
    else:
        rows = translated.to_pylist()
    rows = [r for r in rows if r["lang"] == config.run.dominant_lang and r["split"] == "train"]
    harmful = [r for r in rows if r["harmful"]][: cfg.max_harmful]
    benign = [r for r in rows if not r["harmful"]][: cfg.max_benign]
    if not harmful:
        raise InputDataError(
            f"align: no harmful {config.run.dominant_lang!r} prompts of the train split to align on"
        )
    return harmful, benign


def validation_split(
    harmful: list[dict], benign: list[dict], every: int = 4
) -> tuple[tuple[list[dict], list[dict]], tuple[list[dict], list[dict]]]:
    """((fit harmful, fit benign), (validation harmful, validation benign)): every ``every``-th prompt of each
    list (the 1st, the (every+1)-th, ...) is kept out of training to compare align recipes on, so that a recipe
    is never chosen on the evaluation hold-out."""
    def cut(rows: list[dict]) -> tuple[list[dict], list[dict]]:
        return [r for i, r in enumerate(rows) if i % every], rows[::every]

    (fit_harmful, val_harmful), (fit_benign, val_benign) = cut(harmful), cut(benign)
    return (fit_harmful, fit_benign), (val_harmful, val_benign)


def build_align_rows(
    harmful: list[dict],
    benign: list[dict],
    answers: dict[str, str],
    refusals: list[str],
    method: str,
    *,
    is_refusal: Any,
    seed: int = 0,
) -> tuple[list[dict], dict[str, int]]:
    """Training rows (``target_prompt``, ``target_chosen``, ``target_rejected``, ``kind``) and counts.

    ``answers`` maps prompt ids to the model's own answer; ``is_refusal(text)`` says whether an answer
    refuses. SFT: harmful -> a refusal, benign -> its answer (``target_rejected`` empty). DPO: harmful ->
    refusal over answer, benign -> answer over refusal. A benign answer that refuses is left out, and so (in
    DPO) is a harmful prompt whose answer already refuses: there is nothing to prefer.
    """
    rng = random.Random(seed)
    rows, counts = [], {"harmful": 0, "benign": 0, "benign_answer_refused": 0, "harmful_answer_refused": 0}
    for prompt in harmful:
        answer = answers.get(prompt["prompt_id"], "")
        if method == "dpo" and (not answer.strip() or is_refusal(answer)):
            counts["harmful_answer_refused"] += 1
            continue
        rows.append({"kind": "harmful", "target_prompt": prompt["text"], "target_chosen": rng.choice(refusals),
                     "target_rejected": answer if method == "dpo" else ""})
        counts["harmful"] += 1
    for prompt in benign:
        answer = answers.get(prompt["prompt_id"], "")
        if not answer.strip() or is_refusal(answer):
            counts["benign_answer_refused"] += 1
            continue
        rows.append({"kind": "benign", "target_prompt": prompt["text"], "target_chosen": answer,
                     "target_rejected": rng.choice(refusals) if method == "dpo" else ""})
        counts["benign"] += 1
    return rows, counts


def align_train_config(config: PipelineConfig) -> PipelineConfig:
    """``config`` whose ``train`` section is the align settings, for :func:`mpo_core.training.fit.build_trainer`."""
    cfg = config.align
    train = TrainConfig(
        loss=cfg.method, beta=cfg.beta, learning_rate=cfg.learning_rate, num_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps, lr_scheduler="cosine", warmup_ratio=0.1,
        per_device_batch_size=cfg.per_device_batch_size, max_length=cfg.max_length, save_steps=cfg.save_steps,
        save_total_limit=1, sft_weight=cfg.sft_weight, trainer_args=cfg.trainer_args,
    )
    return config.model_copy(update={"train": train})


def extra_align_rows(
    config: PipelineConfig, is_refusal: Any, sources: list[str | Path] = ()
) -> tuple[list[dict], dict[str, int]]:
    """The ``align.extra_pairs`` rows (none when unset) and their counts; ``sources``: more evaluation prompt
    files whose prompts are kept out (see :func:`evaluation_prompt_texts`). SFT keeps only the chosen answer."""
    cfg = config.align
    if not cfg.extra_pairs:
        return [], {}
    rows, counts = load_extra_pairs(cfg.extra_pairs, evaluation_prompt_texts(config, sources),
                                    is_refusal=is_refusal, limit=cfg.max_extra_pairs)
    if cfg.method == "sft":
        rows = [{**r, "target_rejected": ""} for r in rows]
    return rows, counts


def own_answers(config: PipelineConfig, prompts: list[dict]) -> dict[str, str]:
    """The starting model's greedy answer to each prompt, by prompt id."""
    rows = generate_responses(config.model, config.generate, prompts, num_samples=1, temperature=0.0,
                              max_new_tokens=config.align.answer_max_new_tokens)
    return {r["prompt_id"]: r["text"].strip() for r in rows}

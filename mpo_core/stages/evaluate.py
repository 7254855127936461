"""The evaluate stage: safety, reward gaps and utility per language, for the base and the trained model.

For each model (greedy decoding throughout):

- ASR per language on every safety set: share of harmful prompts whose response the configured judge calls
  unsafe/compliance; over-refusal: share of benign prompts (where a set has them) that the refusal-pattern
  judge calls a refusal (LLM safety judges say safe/unsafe, not whether the model refused); selectivity:
  refusal rate on harmful minus refusal rate on benign prompts (a model refusing everything scores 0);
  ``response_lang_share``: share of responses written in the prompt's language (:mod:`mpo_core.common.langid`);
- reward gap ``RG = s(y_w|x) - s(y_l|x)`` per language on pairs: the model's RG^t on the target side, its
  RG on the dominant side, and the frozen reference's RG^d from the ``reference`` artifact;
- utility: MGSM accuracy (last number of the generated text against the gold integer) and
  likelihood-based multiple choice (M-MMLU style).

Every rate and mean has a percentile-bootstrap interval; the trained-minus-base differences have a paired
bootstrap interval over the same prompts/pairs (rows with ``model == "delta"``).
:func:`evaluate_model` evaluates one model (users evaluate base models alone); :func:`evaluate_models`
several side by side; :func:`run_evaluate` is the stage.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from mpo_core.common.label_noise import describe_noise
from mpo_core.common.langid import identify
from mpo_core.common.verdicts import is_attack_success, is_refusal
from mpo_core.method.premise import held_out_prompt_ids
from mpo_core.plumbing.artifacts import read_artifact, read_manifest, write_artifact
from mpo_core.plumbing.config import LabelConfig, ModelConfig, PipelineConfig
from mpo_core.plumbing.errors import ConfigError, InputDataError
from mpo_core.plumbing.progress import phase, round_seconds
from mpo_core.plumbing.seed import load_seed_prompts
from mpo_core.plumbing.stage_run import Artifact, StageRun
from mpo_core.readers.files import read_csv_records, read_json_lines, read_text
from mpo_core.readers.pairs import load_pairs
from mpo_core.readers.prompts import ingest_prompt_set
from mpo_core.results.metrics import (
    Estimate,
    bootstrap_difference_ci,
    bootstrap_mean_ci,
    mgsm_is_correct,
    parse_gold_answer,
    pick_options,
    summarize_reward_gaps,
    transfer_ceiling,
)
from mpo_core.results.report import write_report
from mpo_core.results.stage_results import read_log_history, training_curve
from mpo_core.training.checkpoints import align_record

if TYPE_CHECKING:
    from mpo_core.generation.backend import GenerationBackend
    from mpo_core.judges.base import Judge

SEED_SET = "seed"
MGSM_HUB_ID = "juletxara/mgsm"
MGSM_LANGS = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")
REFUSAL_JUDGE = "refusal_patterns"
Key = tuple[str, str, str]  # (lang, metric, dataset)


@dataclass(frozen=True)
class PromptSet:
    """Prompts of one safety set: dicts with ``prompt_id, lang, text, harmful``."""

    name: str
    prompts: list[dict]


@dataclass(frozen=True)
class PairSet:
    """Preference pairs for reward gaps (PAIRS columns) and, where known, the reference's RG^d by pair."""

    name: str
    pairs: list[dict]
    reference_gaps: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class UtilitySet:
    """MGSM items (``prompt_id, lang, text, gold``) or multiple-choice items
    (``lang, question, options, answer``)."""

    name: str
    kind: str  # "mgsm" | "mc"
    items: list[dict]


def eval_langs(config: PipelineConfig) -> list[str]:
    """The languages evaluated: ``evaluate.langs`` or the run's dominant and target languages."""
    if config.evaluate.langs is not None:
        return list(config.evaluate.langs)
    return [config.run.dominant_lang, *config.run.target_langs]


def _take_per_lang(rows: Sequence[dict], langs: Sequence[str], limit: int | None) -> list[dict]:
    """Rows in ``langs`` (in the rows' order), at most ``limit`` per language."""
    counts: dict[str, int] = {}
    kept = []
    for row in rows:
        lang = row["lang"]
        if lang in langs and (limit is None or counts.get(lang, 0) < limit):
            counts[lang] = counts.get(lang, 0) + 1
            kept.append(row)
    return kept


def _prompt_dicts(rows: Sequence[dict], set_name: str) -> list[dict]:
    """Prompt dicts with ids prefixed by the set's name (ids stay unique across sets)."""
    return [
        {"prompt_id": f"{set_name}:{r['prompt_id']}", "lang": r["lang"], "text": r["text"],
         "harmful": bool(r["harmful"])}
        for r in rows
    ]


def seed_holdout(translated: pa.Table | None) -> list[dict]:
    """The seed hold-out (``split == "eval"``): from the ``translated`` artifact, else the packaged seed set."""
    if translated is None:

        rows = load_seed_prompts()
    else:
        rows = translated.to_pylist()
    return [r for r in rows if r["split"] == "eval"]


def dataset_name(source: str) -> str:
    """A short name for a data source: ``seed``, ``multijail`` for the MultiJail file or hub id, else the
    file stem or hub id."""
    if source == SEED_SET:
        return SEED_SET
    if "multijail" in source.lower():
        return "multijail"
    path = Path(source)
    return path.stem if path.suffix else source


def load_safety_sets(config: PipelineConfig, translated: pa.Table | None) -> list[PromptSet]:
    """Every ``evaluate.safety_sets`` entry as a :class:`PromptSet` in the evaluated languages, at most
    ``evaluate.max_prompts_per_lang`` prompts per language (the same first prompts in every language)."""
    langs, limit = eval_langs(config), config.evaluate.max_prompts_per_lang
    sets = []
    for source in config.evaluate.safety_sets:
        name = dataset_name(source)
        if source == SEED_SET:
            rows = seed_holdout(translated)
        else:
            rows = ingest_prompt_set(config, source)
        harmful = _take_per_lang([r for r in rows if r["harmful"]], langs, limit)
        benign = _take_per_lang([r for r in rows if not r["harmful"]], langs, limit)
        sets.append(PromptSet(name, _prompt_dicts(harmful + benign, name)))
    return sets


def load_pair_set(
    config: PipelineConfig,
    filtered: pa.Table | None,
    reference: pa.Table | None,
    translated: pa.Table | None = None,
) -> PairSet | None:
    """Pairs for reward gaps: ``evaluate.pairs`` (held-out, via ``ingest.load_pairs``) when set, else the
    ``filtered`` pairs, those of held-out prompts when there are any (named ``pairs:held-out``), otherwise
    all of them (``pairs:train``: the gap the training itself targets). At most ``max_pairs_per_lang`` per
    target language. RG^d of the reference is attached by ``pair_id`` from the ``reference`` artifact."""
    if config.evaluate.pairs is not None:

        table = load_pairs(config.evaluate.pairs, dominant_lang=config.run.dominant_lang)
        name = f"pairs:{dataset_name(config.evaluate.pairs)}"
    elif filtered is not None:
        table = filtered
        held_out = held_out_prompt_ids(translated) if translated is not None else set()
        ids = set(table.column("prompt_id").to_pylist())
        if held_out & ids:
            mask = pa.array([pid in held_out for pid in table.column("prompt_id").to_pylist()])
            table, name = table.filter(mask), "pairs:held-out"
        else:
            name = "pairs:train"
    else:
        return None
    rows = [dict(true_labels(r), lang=r["target_lang"]) for r in table.to_pylist()]
    rows = _take_per_lang(rows, eval_langs(config), config.evaluate.max_pairs_per_lang)
    gaps = {}
    if reference is not None and config.evaluate.pairs is None:
        gaps = dict(zip(reference.column("pair_id").to_pylist(), reference.column("reward_gap").to_pylist()))
    return PairSet(name, rows, gaps)


def _mgsm_lines(path: Path) -> list[tuple[int, str, str]]:
    """``(line number, question, answer)`` of MGSM's ``question<TAB>answer`` lines, read by Arrow's CSV reader
    (tab-separated, no quoting: a question keeps its quotes); blank lines are skipped, a line without exactly
    one tab is an :class:`InputDataError` naming it."""
    import pyarrow.csv as pacsv

    blank_lines, bad_rows = set(), []

    def on_bad_row(row) -> str:
        if row.text.strip():
            bad_rows.append(row)
        else:
            blank_lines.add(row.number)
        return "skip"

    table = pacsv.read_csv(  # every line counts in Arrow's row numbers: an empty one is a row of empty fields
        io.BytesIO(read_text(path).encode("utf-8")),
        read_options=pacsv.ReadOptions(use_threads=False, column_names=["question", "answer"]),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=False,
                                         invalid_row_handler=on_bad_row),
        convert_options=pacsv.ConvertOptions(column_types={"question": pa.string(), "answer": pa.string()},
                                             strings_can_be_null=False),
    )
    if bad_rows:
        raise InputDataError(f"{path}: line {bad_rows[0].number}: expected 'question<TAB>answer', got "
                             f"{bad_rows[0].actual_columns} column(s)")
    line_numbers = (n for n in range(1, table.num_rows + len(blank_lines) + 1) if n not in blank_lines)
    return [(line_no, question, answer)
            for line_no, question, answer in zip(line_numbers, *table.to_pydict().values())
            if question.strip() or answer.strip()]


def _read_mgsm_tsv(path: Path, lang: str, limit: int | None) -> list[dict]:
    """MGSM items ``mgsm-<lang>-<line>`` of one file (:func:`_mgsm_lines`); a bad answer is named (file, line,
    column)."""
    items = []
    for line_no, question, answer in _mgsm_lines(path)[:limit]:
        try:
            gold = parse_gold_answer(answer)
        except ValueError as err:
            raise InputDataError(f"{path}: line {line_no}, column 'answer': {err}") from None
        items.append({"prompt_id": f"mgsm-{lang}-{line_no:04d}", "lang": lang, "text": question, "gold": gold})
    return items


def load_mgsm(source: str, langs: Sequence[str], limit: int | None) -> list[dict]:
    """MGSM items in ``langs`` from a folder of ``mgsm_<lang>.tsv``, one such file, or the hub id
    ``juletxara/mgsm`` (downloaded with ``huggingface_hub`` for users online)."""
    path = Path(source)
    if path.is_file():
        match = re.fullmatch(r"mgsm_([a-z]{2,3})\.tsv", path.name)
        if match is None:
            raise InputDataError(f"{path}: an MGSM file must be named mgsm_<lang>.tsv")
        return _read_mgsm_tsv(path, match.group(1), limit) if match.group(1) in langs else []
    wanted = [lang for lang in langs if lang in MGSM_LANGS]
    if path.is_dir():
        return [item for lang in wanted if (path / f"mgsm_{lang}.tsv").is_file()
                for item in _read_mgsm_tsv(path / f"mgsm_{lang}.tsv", lang, limit)]
    if source == MGSM_HUB_ID:
        from huggingface_hub import hf_hub_download

        return [item for lang in wanted for item in _read_mgsm_tsv(
            Path(hf_hub_download(MGSM_HUB_ID, f"mgsm_{lang}.tsv", repo_type="dataset")), lang, limit)]
    raise InputDataError(f"MGSM source {source!r} is neither a file, a folder nor the hub id {MGSM_HUB_ID!r}")


_MC_LETTERS = "ABCDEFGH"
_MC_LANG_FROM_NAME = re.compile(r"_([A-Za-z]{2,3})(?:[_-][A-Za-z]{2,4})?$")


def _mc_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        return read_csv_records(path)[1]
    if path.suffix in (".jsonl", ".json"):
        return read_json_lines(path)
    raise InputDataError(f"{path}: multiple-choice files must be .csv or .jsonl")


def load_multiple_choice(source: str, langs: Sequence[str], limit: int | None) -> list[dict]:
    """M-MMLU-style items: CSV/JSONL rows with a question (``question``/``Question``), options as columns
    ``A``..``D`` (or an ``options`` list) and the answer as a letter or an index (``answer``/``Answer``). The
    language is a ``lang`` column or the file name's suffix (``mmlu_ZH_CN.csv`` -> ``zh``)."""
    path = Path(source)
    name_lang = _MC_LANG_FROM_NAME.search(path.stem)
    items = []
    for row_no, row in enumerate(_mc_rows(path), 1):
        where = f"{path}: row {row_no}"
        lang = row.get("lang") or (name_lang.group(1).lower() if name_lang else None)
        if not lang:
            raise InputDataError(f"{where}: no 'lang' column and no language in the file name")
        question = row.get("question", row.get("Question"))
        options = row.get("options") or [row[c] for c in _MC_LETTERS if row.get(c) not in (None, "")]
        answer = row.get("answer", row.get("Answer"))
        if not question or len(options) < 2:
            raise InputDataError(f"{where}: column 'question' and at least two options are required")
        if isinstance(answer, str) and answer.strip().upper() in _MC_LETTERS[: len(options)]:
            answer = _MC_LETTERS.index(answer.strip().upper())
        if not isinstance(answer, int) or not 0 <= answer < len(options):
            raise InputDataError(f"{where}, column 'answer': {answer!r} is not an option letter or index")
        items.append({"lang": lang, "question": str(question), "options": [str(o) for o in options],
                      "answer": answer})
    return _take_per_lang(items, langs, limit)


def load_utility_sets(config: PipelineConfig) -> list[UtilitySet]:
    """MGSM and multiple-choice sets named in the config (none by default)."""
    ev, langs = config.evaluate, eval_langs(config)
    sets = [UtilitySet("mgsm", "mgsm", [i for s in ev.mgsm for i in load_mgsm(s, langs, ev.mgsm_max_per_lang)])]
    sets += [UtilitySet(dataset_name(s), "mc", load_multiple_choice(s, langs, ev.mc_max_per_lang))
             for s in ev.multiple_choice]
    return [s for s in sets if s.items]


def true_labels(pair: dict) -> dict:
    """A pair as judged before label noise: chosen and rejected swapped back where ``target_flipped``
    (reward gaps are measured against the true preference, whatever the model was trained on)."""
    if not pair.get("target_flipped"):
        return pair
    return dict(pair, target_chosen=pair["target_rejected"], target_rejected=pair["target_chosen"],
                target_flipped=False)


@dataclass
class Observations:
    """Per-item results of one model: ``values[(lang, metric, dataset)]`` is an array over the items in a
    fixed order (0/1 indicators for rates, gaps for ``reward_gap``), ``judges`` who produced them, and the
    judged responses for inspection."""

    role: str
    model: str
    values: dict[Key, np.ndarray] = field(default_factory=dict)
    judges: dict[Key, str | None] = field(default_factory=dict)
    responses: list[dict] = field(default_factory=list)

    def add(self, key: Key, values: Sequence[float], judge: str | None = None) -> None:
        self.values[key] = np.asarray(values, dtype=np.float64)
        self.judges[key] = judge


def _group_by_lang(items: Sequence[dict]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item["lang"], []).append(i)
    return groups


def _safety(obs: Observations, sets: Sequence[PromptSet], rows: list[dict], judge: Judge,
            refusal_judge: Judge) -> list[dict]:
    """ASR (``judge``) on harmful prompts, over-refusal (``refusal_judge``) on benign prompts, refusals
    (``refusal_judge``) on harmful prompts (``harmful_refusal``, half of selectivity) and, on every prompt,
    whether the response is written in the prompt's language (:func:`in_prompt_language`); returns the
    responses with their verdicts."""
    from mpo_core.judges.base import label_rows

    judged, offset = [], 0
    for prompt_set in sets:
        set_rows = rows[offset : offset + len(prompt_set.prompts)]
        offset += len(prompt_set.prompts)
        for harmful, metric, this_judge in ((True, "asr", judge), (False, "over_refusal", refusal_judge)):
            chosen = [(p, r) for p, r in zip(prompt_set.prompts, set_rows) if p["harmful"] == harmful]
            if not chosen:
                continue
            labelled = label_rows(this_judge, [r for _, r in chosen])
            judged += labelled
            flags = [is_attack_success(r["verdict"]) if harmful else is_refusal(r["verdict"]) for r in labelled]
            refused = [is_refusal(r["verdict"]) for r in labelled]
            if harmful and this_judge is not refusal_judge:
                refused = [is_refusal(r["verdict"]) for r in label_rows(refusal_judge, [r for _, r in chosen])]
            for lang, idx in _group_by_lang([p for p, _ in chosen]).items():
                obs.add((lang, metric, prompt_set.name), [flags[i] for i in idx], this_judge.name)
                if harmful:
                    obs.add((lang, "harmful_refusal", prompt_set.name), [refused[i] for i in idx],
                            refusal_judge.name)
        in_lang = in_prompt_language([r["text"] for r in set_rows], [p["lang"] for p in prompt_set.prompts])
        for lang, idx in _group_by_lang(prompt_set.prompts).items():
            obs.add((lang, "response_lang_share", prompt_set.name), [in_lang[i] for i in idx], LANGID_NAME)
    return judged


LANGID_NAME = "langid"


def in_prompt_language(texts: Sequence[str], langs: Sequence[str]) -> list[bool]:
    """Whether each response is written in its prompt's language, by :func:`mpo_core.common.langid.identify`
    (an empty or letterless response is in no language)."""

    return [guess == lang for (guess, _), lang in zip(identify(list(texts)), langs, strict=True)]


def _reward_gaps(obs: Observations, model, tokenizer, pair_set: PairSet, dominant_lang: str,
                 max_length: int, batch_size: int, truncation: str) -> None:
    """RG^t per target language, and RG on the dominant side (distinct dominant triples) under ``model``,
    each pair encoded as training encodes it (``model.truncation``)."""
    from mpo_core.method.logps import reward_gaps

    pairs = pair_set.pairs
    gaps = reward_gaps(
        model, tokenizer, [p["target_prompt"] for p in pairs], [p["target_chosen"] for p in pairs],
        [p["target_rejected"] for p in pairs], max_length=max_length, batch_size=batch_size, truncation=truncation,
    ).tolist()
    obs_langs = _group_by_lang(pairs)
    for lang, idx in obs_langs.items():
        obs.add((lang, "reward_gap", pair_set.name), [gaps[i] for i in idx])
    dominant = _dominant_triples(pairs, dominant_lang)
    if dominant and dominant_lang not in obs_langs:  # English-only pairs (HH-RLHF): already measured
        dom_gaps = reward_gaps(
            model, tokenizer, [t[0] for t in dominant], [t[1] for t in dominant], [t[2] for t in dominant],
            max_length=max_length, batch_size=batch_size, truncation=truncation,
        ).tolist()
        obs.add((dominant_lang, "reward_gap", pair_set.name), dom_gaps)


def _dominant_triples(pairs: Sequence[dict], dominant_lang: str) -> list[tuple[str, str, str]]:
    """Distinct (prompt, chosen, rejected) of the dominant side, in first-seen order."""
    seen: dict[tuple[str, str, str], None] = {}
    for p in pairs:
        if p["dominant_lang"] == dominant_lang:
            seen.setdefault((p["dominant_prompt"], p["dominant_chosen"], p["dominant_rejected"]), None)
    return list(seen)


def _mgsm(obs: Observations, utility: UtilitySet, backend: GenerationBackend, model_cfg: ModelConfig,
          config: PipelineConfig) -> None:
    from mpo_core.generation.responses import generate_responses

    rows = generate_responses(model_cfg, config.generate, utility.items, num_samples=1, temperature=0.0,
                              max_new_tokens=config.evaluate.mgsm_max_new_tokens, backend=backend)
    correct = [mgsm_is_correct(r["text"], item["gold"], item["lang"]) for r, item in zip(rows, utility.items)]
    for lang, idx in _group_by_lang(utility.items).items():
        obs.add((lang, "mgsm_accuracy", utility.name), [correct[i] for i in idx])


def _multiple_choice(obs: Observations, utility: UtilitySet, model, tokenizer, config: PipelineConfig) -> None:
    from mpo_core.method.logps import response_avg_logps

    def logp_fn(prompts: list[str], responses: list[str]) -> list[float]:
        return response_avg_logps(model, tokenizer, prompts, responses, max_length=config.evaluate.max_length,
                                  batch_size=config.evaluate.batch_size).tolist()

    items = utility.items
    picks = pick_options([i["question"] for i in items], [i["options"] for i in items], logp_fn)
    for lang, idx in _group_by_lang(items).items():
        obs.add((lang, "mc_accuracy", utility.name), [picks[i] == items[i]["answer"] for i in idx])


def evaluate_model(
    model_cfg: ModelConfig,
    config: PipelineConfig,
    *,
    role: str = "base",
    safety_sets: Sequence[PromptSet] = (),
    pair_set: PairSet | None = None,
    utility_sets: Sequence[UtilitySet] = (),
    judge: Judge | None = None,
    refusal_judge: Judge | None = None,
) -> Observations:
    """Evaluate one model: the log-likelihood metrics (reward gaps, multiple choice) first, then the
    generation metrics (safety, MGSM) with greedy decoding. Harmful prompts are judged by ``judge``, benign
    ones by ``refusal_judge`` (defaults: :func:`get_judges`). With the transformers backend one loaded model
    serves both; with vLLM the transformers model is freed before the vLLM engine starts."""
    from mpo_core.common.models import load_model, load_tokenizer
    from mpo_core.generation.responses import generate_responses, get_backend
    from mpo_core.generation.transformers_backend import TransformersBackend

    obs = Observations(role=role, model=model_cfg.name_or_path)
    model, tokenizer = load_model(model_cfg), load_tokenizer(model_cfg, padding_side="left")
    model.eval()
    ev = config.evaluate
    if pair_set is not None and pair_set.pairs:
        _reward_gaps(obs, model, tokenizer, pair_set, config.run.dominant_lang, ev.max_length, ev.batch_size,
                     config.model.truncation)
    for utility in utility_sets:
        if utility.kind == "mc":
            _multiple_choice(obs, utility, model, tokenizer, config)
    if config.generate.backend == "transformers":
        backend = TransformersBackend(model_cfg, config.generate.batch_size, model=model, tokenizer=tokenizer)
    else:
        del model
        _free_accelerator_memory()
        backend = get_backend(model_cfg, config.generate)
    prompts = [p for s in safety_sets for p in s.prompts]
    if prompts:
        rows = generate_responses(model_cfg, config.generate, prompts, num_samples=1, temperature=0.0,
                                  max_new_tokens=ev.max_new_tokens, backend=backend)
        if judge is None or refusal_judge is None:
            judge, refusal_judge = get_judges(config)
        obs.responses = _safety(obs, safety_sets, rows, judge, refusal_judge)
    for utility in utility_sets:
        if utility.kind == "mgsm":
            _mgsm(obs, utility, backend, model_cfg, config)
    return obs


def get_judges(config: PipelineConfig) -> tuple[Judge, Judge]:
    """The safety judge of ``config.label`` (for ASR) and the refusal-pattern judge (for over-refusal: LLM
    safety judges say safe/unsafe, not whether the model refused); one object when they are the same."""
    from mpo_core.judges.select import get_judge

    judge = get_judge(config.label, config.model)
    if config.label.judge == REFUSAL_JUDGE:
        return judge, judge
    return judge, get_judge(LabelConfig(judge=REFUSAL_JUDGE, patterns=config.label.patterns))


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _row(model: str, key: Key, est: Estimate, judge: str | None, metric: str | None = None) -> dict[str, Any]:
    lang, base_metric, dataset = key
    return {
        "model": model, "lang": lang, "metric": metric or base_metric, "value": est.value,
        "ci_low": est.ci_low, "ci_high": est.ci_high, "n": est.n, "judge": judge, "dataset": dataset,
    }


def _selectivity_keys(values: dict[Key, np.ndarray]) -> list[tuple[Key, Key, Key]]:
    """(selectivity key, harmful-refusal key, over-refusal key) for every (lang, dataset) having both."""
    return [
        ((lang, "selectivity", dataset), (lang, "harmful_refusal", dataset), (lang, "over_refusal", dataset))
        for lang, metric, dataset in sorted(values)
        if metric == "harmful_refusal" and (lang, "over_refusal", dataset) in values
    ]


def summary_rows(obs: Observations, config: PipelineConfig) -> list[dict[str, Any]]:
    """EVAL rows of one model: mean with bootstrap CI per (lang, metric, dataset); for reward gaps also
    std, 10/50/90 % quantiles and the share of positive gaps (no interval); ``selectivity`` = refusal rate
    on harmful minus refusal rate on benign prompts, with an interval resampling each side on its own."""
    ev = config.evaluate
    kwargs = {"num_samples": ev.bootstrap_samples, "confidence": ev.confidence, "seed": config.run.seed}
    rows = []
    for key, values in sorted(obs.values.items()):
        rows.append(_row(obs.role, key, bootstrap_mean_ci(values, **kwargs), obs.judges[key]))
        if key[1] == "reward_gap":
            summary = summarize_reward_gaps(values, **kwargs)
            for name in ("std", "p10", "p50", "p90", "positive_share"):
                point = Estimate(getattr(summary, name), None, None, len(values))
                rows.append(_row(obs.role, key, point, None, metric=f"reward_gap_{name}"))
    for key, harmful, benign in _selectivity_keys(obs.values):
        estimate = bootstrap_difference_ci(obs.values[harmful], obs.values[benign], **kwargs)
        rows.append(_row(obs.role, key, estimate, obs.judges[benign]))
    return rows


def paired_delta_rows(base: Observations, trained: Observations, config: PipelineConfig) -> list[dict]:
    """``model == "delta"`` rows: mean of (trained - base) per item with a paired bootstrap interval (for
    selectivity, the harmful and benign differences resampled each on its own)."""
    ev = config.evaluate
    kwargs = {"num_samples": ev.bootstrap_samples, "confidence": ev.confidence, "seed": config.run.seed}
    rows = []
    diffs = {}
    for key in sorted(base.values.keys() & trained.values.keys()):
        if len(base.values[key]) == len(trained.values[key]):
            diffs[key] = trained.values[key] - base.values[key]
            rows.append(_row("delta", key, bootstrap_mean_ci(diffs[key], **kwargs), trained.judges[key]))
    for key, harmful, benign in _selectivity_keys(diffs):
        estimate = bootstrap_difference_ci(diffs[harmful], diffs[benign], **kwargs)
        rows.append(_row("delta", key, estimate, trained.judges[benign]))
    return rows


def reference_rows(pair_set: PairSet | None, config: PipelineConfig) -> list[dict]:
    """RG^d of the frozen reference (from the ``reference`` artifact) per target language of the pairs it
    was computed on, and over the distinct dominant-language triples for the dominant language."""
    if pair_set is None or not pair_set.reference_gaps:
        return []
    ev = config.evaluate
    kwargs = {"num_samples": ev.bootstrap_samples, "confidence": ev.confidence, "seed": config.run.seed}
    known = [p for p in pair_set.pairs if p["pair_id"] in pair_set.reference_gaps]
    rows = []
    for lang, idx in _group_by_lang(known).items():
        gaps = [pair_set.reference_gaps[known[i]["pair_id"]] for i in idx]
        rows.append(_row("reference", (lang, "reward_gap", pair_set.name), bootstrap_mean_ci(gaps, **kwargs), None))
    by_triple: dict[tuple[str, str, str], float] = {}
    for p in known:  # one dominant triple serves every target language: count it once
        triple = (p["dominant_prompt"], p["dominant_chosen"], p["dominant_rejected"])
        by_triple.setdefault(triple, pair_set.reference_gaps[p["pair_id"]])
    if by_triple:
        key = (config.run.dominant_lang, "reward_gap", pair_set.name)
        rows.append(_row("reference", key, bootstrap_mean_ci(list(by_triple.values()), **kwargs), None))
    return rows


@dataclass
class EvaluationResult:
    """EVAL rows of every model and the per-model observations they came from."""

    rows: list[dict[str, Any]]
    observations: dict[str, Observations]
    datasets: dict[str, str]
    seconds: float


def evaluate_models(
    config: PipelineConfig,
    models: dict[str, ModelConfig],
    *,
    translated: pa.Table | None = None,
    filtered: pa.Table | None = None,
    reference: pa.Table | None = None,
) -> EvaluationResult:
    """Evaluate ``models`` (role -> model config, e.g. ``{"base": ..., "trained": ...}``) on the same data:
    summaries per model, paired deltas when both ``base`` and ``trained`` are present, and the reference's
    RG^d."""
    started = time.perf_counter()
    safety_sets = load_safety_sets(config, translated)
    pair_set = load_pair_set(config, filtered, reference, translated)
    utility_sets = load_utility_sets(config)
    judge, refusal_judge = get_judges(config) if safety_sets else (None, None)
    observations = {}
    for role, cfg in models.items():
        with phase(f"{role} model"):
            observations[role] = evaluate_model(cfg, config, role=role, safety_sets=safety_sets,
                                                pair_set=pair_set, utility_sets=utility_sets, judge=judge,
                                                refusal_judge=refusal_judge)
    rows = [row for obs in observations.values() for row in summary_rows(obs, config)]
    if "base" in observations and "trained" in observations:
        rows += paired_delta_rows(observations["base"], observations["trained"], config)
    rows += reference_rows(pair_set, config)
    datasets = {s.name: f"{len(s.prompts)} prompts" for s in safety_sets}
    if pair_set is not None:
        datasets[pair_set.name] = f"{len(pair_set.pairs)} pairs"
    datasets.update({u.name: f"{len(u.items)} items" for u in utility_sets})
    return EvaluationResult(rows, observations, datasets, time.perf_counter() - started)


def report_meta(config: PipelineConfig, models: dict[str, ModelConfig], result: EvaluationResult,
                config_hash: str) -> dict[str, Any]:
    """The facts that head the report: models, judge, data, decoding, config hash, time taken."""
    meta: dict[str, Any] = {f"model ({role})": cfg.name_or_path for role, cfg in models.items()}
    judges = {key[1]: name for obs in result.observations.values() for key, name in obs.judges.items() if name}
    meta["judge (ASR)"] = judges.get("asr", config.label.judge)
    meta["judge (over-refusal)"] = judges.get("over_refusal", REFUSAL_JUDGE)
    meta["data"] = "; ".join(f"{name}: {what}" for name, what in result.datasets.items())
    meta["decoding"] = (f"greedy, max_new_tokens={config.evaluate.max_new_tokens}, "
                        f"backend={config.generate.backend}")
    meta["label noise (target side)"] = describe_noise(config.pair.target_noise, config.pair.noise_seed)
    meta["config hash"] = config_hash
    meta["evaluation time"] = f"{round_seconds(result.seconds)} s"
    return meta


def write_evaluation(
    result: EvaluationResult,
    config: PipelineConfig,
    models: dict[str, ModelConfig],
    out_dir: str | Path,
    *,
    config_hash: str,
    inputs: dict[str, str] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the ``eval`` artifact, the judged responses of each model (``responses_<role>.parquet``) and
    the report folder into ``out_dir`` (``extra_meta`` joins the report's head); return
    ``{"eval", "report", "report_html"}`` paths."""

    out_dir = Path(out_dir)
    for role, obs in result.observations.items():
        if obs.responses:
            write_artifact(obs.responses, out_dir / f"responses_{role}.parquet", "responses",
                           config_hash=config_hash, inputs=inputs)
    eval_path = out_dir / "eval.parquet"
    write_artifact(result.rows, eval_path, "eval", config_hash=config_hash, inputs=inputs,
                   extra={"models": {r: m.name_or_path for r, m in models.items()}, "datasets": result.datasets,
                          "seconds": round_seconds(result.seconds)})
    meta = report_meta(config, models, result, config_hash) | (extra_meta or {})
    report = write_report(result.rows, out_dir / "report", meta=meta)
    return {"eval": eval_path, "report": report["markdown"], "report_html": report["html"]}


def selected_roles(models: dict[str, ModelConfig], roles: list[str] | None) -> dict[str, ModelConfig]:
    """The models of ``roles`` (``evaluate.roles``; None: all); an error names a role the run lacks."""
    if roles is None:
        return models
    unknown = [r for r in roles if r not in models]
    if unknown:
        raise ConfigError(f"evaluate.roles names {unknown}; this run has the models {list(models)}")
    return {role: models[role] for role in roles}


def transfer_summary(rows: Sequence[dict], config: PipelineConfig) -> str | None:
    """One honest sentence on whether safety transferred (trained against base, on the first safety set):
    in how many target languages selectivity rose, ASR fell without over-refusal rising, and English's
    ASR change; the transfer ceiling (:func:`transfer_ceiling` of the starting model); and, where the starting
    model's dominant language is not safer than its targets (ASR and selectivity), that there was nothing to
    transfer. None without a base, a trained model or a safety set."""
    cell = {(r["model"], r["lang"], r["metric"], r["dataset"]): r["value"] for r in rows}
    datasets = sorted({r["dataset"] for r in rows if r["metric"] == "selectivity"})
    if not datasets or not any(k[0] == "trained" for k in cell):
        return None
    dataset, targets = datasets[0], [t for t in config.run.target_langs if ("base", t, "asr", datasets[0]) in cell]
    if not targets:
        return None

    def delta(lang: str, metric: str) -> float:
        return cell.get(("trained", lang, metric, dataset), math.nan) - cell.get(("base", lang, metric, dataset),
                                                                                   math.nan)

    more_selective = [t for t in targets if delta(t, "selectivity") > 0]
    safer = [t for t in targets if delta(t, "asr") < 0 and not delta(t, "over_refusal") > 0]
    dominant = config.run.dominant_lang
    ceiling = transfer_ceiling(cell.get(("base", dominant, "asr", dataset), math.nan),
                               [cell[("base", t, "asr", dataset)] for t in targets])
    return (
        f"{dataset}, trained vs base: selectivity up in {len(more_selective)} of {len(targets)} target languages "
        f"({', '.join(more_selective) or 'none'}); ASR down without over-refusal up in {len(safer)} "
        f"({', '.join(safer) or 'none'}); {dominant} ASR {delta(dominant, 'asr'):+.3f}, mean target "
        f"selectivity change {np.nanmean([delta(t, 'selectivity') for t in targets]) if targets else math.nan:+.3f}. "
        f"Tiny held-out sets: read the intervals before calling this a transfer. Transfer ceiling {ceiling:.3f} "
        f"(the mean target ASR drop if every target became as safe as {dominant} in the starting model)."
        + nothing_to_transfer(cell, dataset, dominant, targets)
    )


def nothing_to_transfer(cell: dict, dataset: str, dominant: str, targets: list[str]) -> str:
    """The diagnosis when the starting model (``base``) is no safer in the dominant language than in its
    targets: MPO pulls each target gap toward the dominant one, so it cannot make a target language refuse
    what the dominant language does not. Empty when the dominant language is safer."""
    base = {m: cell.get(("base", dominant, m, dataset), math.nan) for m in ("asr", "selectivity")}
    target_asr = float(np.nanmean([cell.get(("base", t, "asr", dataset), math.nan) for t in targets]))
    target_sel = float(np.nanmean([cell.get(("base", t, "selectivity", dataset), math.nan) for t in targets]))
    if base["asr"] < target_asr or base["selectivity"] > target_sel:
        return ""
    return (f" Nothing to transfer: the starting model answers harmful {dominant} prompts as often as target ones "
            f"({dominant} ASR {base['asr']:.3f}, selectivity {base['selectivity']:+.3f}; targets {target_asr:.3f}, "
            f"{target_sel:+.3f}), so MPO can move reward gaps but not make the targets refuse; align the dominant "
            "language first (README, 'Choosing the align recipe').")


TARGET_MEAN_METRICS = ("asr", "over_refusal", "selectivity", "response_lang_share")


def target_means_line(rows: Sequence[dict], config: PipelineConfig) -> str | None:
    """Each model's mean over the target languages of ASR, over-refusal, selectivity and response-language
    share on the first safety set, and of RG on the pairs data set, in the order raw -> base -> trained
    (the per-language values and intervals are in the tables). None without a trained model."""
    roles = [r for r in ("raw", "base", "trained") if any(row["model"] == r for row in rows)]
    if "trained" not in roles:
        return None
    safety = sorted({r["dataset"] for r in rows if r["metric"] == "asr"})
    parts = []
    for metric in (*TARGET_MEAN_METRICS, "reward_gap"):
        values = []
        for role in roles:
            picked = [r["value"] for r in rows if r["model"] == role and r["metric"] == metric
                      and r["lang"] in config.run.target_langs
                      and (r["dataset"].startswith("pairs:") if metric == "reward_gap" else r["dataset"] in safety[:1])]
            values.append(f"{np.mean(picked):.3f}" if picked else "–")
        parts.append(f"{metric} {' -> '.join(values)}")
    return f"{' -> '.join(roles)}: " + "; ".join(parts)


def pair_supply_line(filtered: Path, translated: Path) -> str:
    """Per target language ``train / held-out (raw)`` pair counts of the filtered pairs (held-out: prompts
    of the ``eval`` split; raw: the dominant rejected answer is the raw model's, see :mod:`mpo_core.stages.pair`)."""
    from mpo_core.pairs.supply import pair_supply

    held_out = held_out_prompt_ids(read_artifact(translated, "prompts"))
    supply = pair_supply(read_artifact(filtered, "pairs").to_pylist(), held_out)
    return "; ".join(f"{lang} {c['train']} / {c['held_out']} ({c['raw_rejected']} raw)" for lang, c in supply.items()) \
        or "none"


def training_curve_line(log_path: Path) -> str | None:
    """``loss``, ``l1``, ``l2``, the training pairs' mean target and dominant gaps at the first and the last
    logged step of a trainer's log history (None without one): whether training moved what it optimises."""

    curve = training_curve(read_log_history(log_path))
    if not curve:
        return None
    first, last = curve[0], curve[-1]
    keys = [k for k in ("loss", "l1", "l2", "target_gap", "dominant_gap") if k in first and k in last]
    return f"steps {first['step']} -> {last['step']}: " + ", ".join(
        f"{k} {first[k]:+.3f} -> {last[k]:+.3f}" for k in keys if first[k] is not None and last[k] is not None)


def pipeline_meta(inputs: dict[str, Path]) -> dict[str, str]:
    """Report lines on how the models came to be: what ``align`` trained on, and MPO's premise (mean RG^d
    and share of pairs with RG^d > 0 per target language) on the pairs the train stage used, else on every
    pair the reference stage saw."""
    from mpo_core.training.checkpoints import LOG_HISTORY, TRAIN_INFO

    meta = {}
    if "aligned" in inputs and (record := align_record(inputs["aligned"])):
        rows, extra = record.pop("rows", {}), record.pop("extra_pairs", None)
        meta["align (raw -> base)"] = (
            ", ".join(f"{k}={v}" for k, v in record.items())
            + f"; trained on {rows.get('harmful', 0)} harmful prompts -> refusals, {rows.get('benign', 0)} benign "
            f"prompts -> own answers ({rows.get('benign_answer_refused', 0)} benign answers that refused left out)"
            + (f", {extra.get('extra', 0)} harmful prompts of {extra.get('file')} -> their safe answer over their "
               f"unsafe one ({extra.get('evaluation_overlap_dropped', 0)} equal to an evaluation prompt and "
               f"{extra.get('rejected_refused', 0)} whose unsafe answer refuses left out)" if extra else "")
        )
    if "filtered" in inputs and "translated" in inputs:
        meta["pairs after the filter (train / held-out; training pairs rejecting the raw model's answer)"] = (
            pair_supply_line(inputs["filtered"], inputs["translated"]))
    premise, where = None, ""
    info_path = Path(inputs["checkpoint"]) / TRAIN_INFO if "checkpoint" in inputs else None
    if info_path is not None and info_path.is_file():
        premise, where = json.loads(info_path.read_text(encoding="utf-8")).get("premise"), "training pairs"
    if premise is None and "reference" in inputs:
        premise, where = read_manifest(inputs["reference"]).extra.get("premise"), "all pairs"
    if info_path is not None and (curve := training_curve_line(info_path.parent / LOG_HISTORY)):
        meta["training curve (first -> last logged step)"] = curve
    if premise:
        meta[f"MPO premise ({where}): share RG^d > 0, mean RG^d"] = "; ".join(
            f"{lang} {s['safe_share']:.2f}, {s['mean_reward_gap']:+.2f} (n={s['n']})" for lang, s in premise.items()
        )
    return meta


def run_evaluate(stage: StageRun) -> dict[str, Artifact]:
    """Stage ``evaluate``: the starting model (``base``: the aligned checkpoint when align ran, else
    ``config.model``), the trained model (``checkpoint``) and, when align ran, the un-aligned ``raw`` model
    side by side -> ``eval`` artifact and ``report`` (Markdown, with ``report.html`` and the plots beside it)."""
    config, inputs = stage.config, stage.inputs
    models = {"raw": config.model} if "aligned" in inputs else {}
    models["base"] = stage.model
    if "checkpoint" in inputs:
        models["trained"] = config.model.model_copy(update={"name_or_path": str(inputs.path("checkpoint"))})
    models = selected_roles(models, config.evaluate.roles)
    result = evaluate_models(config, models, translated=inputs.table_or_none("translated"),
                             filtered=inputs.table_or_none("filtered"), reference=inputs.table_or_none("reference"))
    meta = pipeline_meta(inputs.paths)
    if (summary := transfer_summary(result.rows, config)) is not None:
        meta["transfer"] = summary
    if (means := target_means_line(result.rows, config)) is not None:
        meta["target languages, mean"] = means
    write_evaluation(result, config, models, stage.out_dir, **stage.provenance, extra_meta=meta)
    return {}

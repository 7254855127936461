"""Measuring one model: safety, reward gaps and utility per language, as per-item observations.

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

:func:`evaluate_model` evaluates one model (users evaluate base models alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING

import numpy as np

from mpo_core.common.langid import identify
from mpo_core.common.verdicts import is_attack_success, is_refusal
from mpo_core.evaluation.sets import PairSet, PromptSet, UtilitySet, group_by_lang
from mpo_core.generation.responses import generate_responses, get_backend
from mpo_core.generation.transformers_backend import TransformersBackend
from mpo_core.generation.vllm_backend import ENGINES
from mpo_core.judges.base import label_rows
from mpo_core.judges.select import get_judge
from mpo_core.plumbing.config import LabelConfig, ModelConfig, PipelineConfig
from mpo_core.plumbing.errors import InputDataError
from mpo_core.results.metrics import (
    mgsm_is_correct,
    pick_options,
)

if TYPE_CHECKING:
    from mpo_core.generation.backend import GenerationBackend
    from mpo_core.judges.base import Judge


REFUSAL_JUDGE = "refusal_patterns"
Key = tuple[str, str, str]  # (lang, metric, dataset)


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


def _safety(obs: Observations, sets: Sequence[PromptSet], rows: list[dict], judge: Judge,
            refusal_judge: Judge) -> list[dict]:
    """ASR (``judge``) on harmful prompts, over-refusal (``refusal_judge``) on benign prompts, refusals
    (``refusal_judge``) on harmful prompts (``harmful_refusal``, half of selectivity) and, on every prompt,
    whether the response is written in the prompt's language (:func:`in_prompt_language`); returns the
    responses with their verdicts."""
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
            for lang, idx in group_by_lang([p for p, _ in chosen]).items():
                obs.add((lang, metric, prompt_set.name), [flags[i] for i in idx], this_judge.name)
                if harmful:
                    obs.add((lang, "harmful_refusal", prompt_set.name), [refused[i] for i in idx],
                            refusal_judge.name)
        in_lang = in_prompt_language([r["text"] for r in set_rows], [p["lang"] for p in prompt_set.prompts])
        for lang, idx in group_by_lang(prompt_set.prompts).items():
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
    obs_langs = group_by_lang(pairs)
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


@dataclass(frozen=True)
class AnswerRequest:
    """One greedy answer evaluation asks of every model: a safety prompt or an MGSM question (``part``),
    a prompt dict with ``prompt_id, lang, text``."""

    part: str  # "safety" | "mgsm"
    prompt: dict


def answer_requests(safety_sets: Sequence[PromptSet], utility_sets: Sequence[UtilitySet]) -> list[AnswerRequest]:
    """What evaluating a model generates, in a fixed order: every safety prompt, then every MGSM question
    (the unit a sharded evaluate splits, :mod:`mpo_core.plumbing.shards`)."""
    return ([AnswerRequest("safety", p) for s in safety_sets for p in s.prompts]
            + [AnswerRequest("mgsm", item) for u in utility_sets if u.kind == "mgsm" for item in u.items])


def generate_answers(model_cfg: ModelConfig, config: PipelineConfig, requests: Sequence[AnswerRequest],
                     backend: GenerationBackend) -> list[dict]:
    """RESPONSES rows, one greedy answer per request in order: safety prompts up to
    ``evaluate.max_new_tokens``, MGSM questions up to ``evaluate.mgsm_max_new_tokens``."""
    limits = {"safety": config.evaluate.max_new_tokens, "mgsm": config.evaluate.mgsm_max_new_tokens}
    rows: list[dict] = []
    for part, group in groupby(requests, key=lambda r: r.part):
        rows += generate_responses(model_cfg, config.generate, [r.prompt for r in group], num_samples=1,
                                   temperature=0.0, max_new_tokens=limits[part], backend=backend)
    return rows


def check_answers(answers: Sequence[dict], requests: Sequence[AnswerRequest], origin: str) -> None:
    """``answers`` answer ``requests`` one to one, in order; an :class:`InputDataError` names the first row
    that does not (answers generated for other evaluation sets)."""
    if len(answers) != len(requests):
        raise InputDataError(f"{origin}: {len(answers)} answers for {len(requests)} evaluation prompts")
    for row, (answer, request) in enumerate(zip(answers, requests)):
        asked = (request.prompt["prompt_id"], request.prompt["lang"], request.prompt["text"])
        if (answer["prompt_id"], answer["lang"], answer["prompt"]) != asked:
            raise InputDataError(f"{origin}, row {row}: answers {answer['prompt_id']}/{answer['lang']}, "
                                 f"the evaluation asks {asked[0]}/{asked[1]} there")


def _mgsm(obs: Observations, utility: UtilitySet, rows: Sequence[dict]) -> None:
    correct = [mgsm_is_correct(r["text"], item["gold"], item["lang"]) for r, item in zip(rows, utility.items)]
    for lang, idx in group_by_lang(utility.items).items():
        obs.add((lang, "mgsm_accuracy", utility.name), [correct[i] for i in idx])


def _multiple_choice(obs: Observations, utility: UtilitySet, model, tokenizer, config: PipelineConfig) -> None:
    from mpo_core.method.logps import response_avg_logps

    def logp_fn(prompts: list[str], responses: list[str]) -> list[float]:
        return response_avg_logps(model, tokenizer, prompts, responses, max_length=config.evaluate.max_length,
                                  batch_size=config.evaluate.batch_size).tolist()

    items = utility.items
    picks = pick_options([i["question"] for i in items], [i["options"] for i in items], logp_fn)
    for lang, idx in group_by_lang(items).items():
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
    answers: Sequence[dict] | None = None,
) -> Observations:
    """Evaluate one model: the log-likelihood metrics (reward gaps, multiple choice) first, then the
    generation metrics (safety, MGSM) on its greedy answers to :func:`answer_requests`: ``answers`` where
    they were generated elsewhere (a sharded evaluate), else generated here. Harmful prompts are judged by
    ``judge``, benign ones by ``refusal_judge`` (defaults: :func:`get_judges`). With the transformers backend
    one loaded model serves both; with vLLM the transformers model is freed before the vLLM engine starts."""
    from mpo_core.common.models import load_model, load_tokenizer

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
    requests = answer_requests(safety_sets, utility_sets)
    if answers is None and requests:
        if config.generate.backend == "transformers":
            backend = TransformersBackend(model_cfg, config.generate.batch_size, model=model, tokenizer=tokenizer)
        else:
            del model
            _free_accelerator_memory()
            backend = get_backend(model_cfg, config.generate)
        answers = generate_answers(model_cfg, config, requests, backend)
        ENGINES.shutdown()  # vLLM: this model's engine goes before the next model loads
    answers = list(answers or [])
    check_answers(answers, requests, f"the {role} model's answers")
    safety_rows = answers[: sum(len(s.prompts) for s in safety_sets)]
    if safety_rows:
        if judge is None or refusal_judge is None:
            judge, refusal_judge = get_judges(config)
        obs.responses = _safety(obs, safety_sets, safety_rows, judge, refusal_judge)
    offset = len(safety_rows)
    for utility in utility_sets:
        if utility.kind == "mgsm":
            _mgsm(obs, utility, answers[offset : offset + len(utility.items)])
            offset += len(utility.items)
    return obs


def get_judges(config: PipelineConfig) -> tuple[Judge, Judge]:
    """The safety judge of ``config.label`` (for ASR) and the refusal-pattern judge (for over-refusal: LLM
    safety judges say safe/unsafe, not whether the model refused); one object when they are the same."""
    judge = get_judge(config.label, config.model, config.generate.vllm)
    if config.label.judge == REFUSAL_JUDGE:
        return judge, judge
    return judge, get_judge(LabelConfig(judge=REFUSAL_JUDGE, patterns=config.label.patterns))


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

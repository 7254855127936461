"""Choose the ``align`` recipe honestly: candidates compared on a validation subset of the English TRAIN split.

The English train-split seed prompts (40 harmful, 20 benign) are cut in two (:func:`mpo_core.training.align_data.
validation_split`): every 4th harmful and every 4th benign prompt (10 + 5) is kept out of align's training
and judged after it; each candidate trains on the rest (30 + 15). The evaluation hold-out is never looked at
during selection. ``--holdout NAME ...`` then trains the named candidates on the whole train split (as the
pipeline does) and measures them once on the seed hold-out in every language: ASR, over-refusal,
selectivity, response-language share, with n and bootstrap intervals.

The starting model's greedy answers to the train prompts are generated once and cached in ``--out``.
Greedy decoding of ``evaluate.max_new_tokens`` tokens, the judge of ``label.judge``. Example::

    python benchmarks/align_select.py                          # every candidate, validation table
    python benchmarks/align_select.py --candidates dpo_b01 sft_30
    python benchmarks/align_select.py --candidates none --holdout sft_30 dpo_b01

The last line names the candidate with the highest ``selectivity`` in the dominant language in the last table
(hold-out where measured, else validation) and its figures::

    align_select_seconds=<s> candidates=<n> best=<name> best_asr=<a> best_over_refusal=<o> best_selectivity=<v>

``--smoke`` (what CI runs, ``tests/test_benchmarks.py``): the default path (validation) for ``dpo_12`` alone,
capped at one step, on the first 2 harmful and 2 benign prompts (one of each validates), 4-token answers,
into ``runs/align_select-smoke``; flags and overrides given beside it still win (``--holdout dpo_12`` adds
the hold-out in English and Chinese, 2 + 2 prompts each).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import pyarrow as pa

from mpo_core.evaluation.measure import evaluate_model
from mpo_core.evaluation.sets import PromptSet, seed_holdout
from mpo_core.evaluation.summaries import summary_rows
from mpo_core.plumbing.config import PipelineConfig, load_config
from mpo_core.plumbing.seed import load_seed_prompts
from mpo_core.training.align_data import (
    align_train_config,
    build_align_rows,
    extra_align_rows,
    load_refusals,
    refusal_check,
    validation_split,
)
from mpo_core.training.fit import fit

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
MPO_PAIRS = str(SHARED_DATA / "mpo_official" / "llama_mpo_data.json")  # 100 English harmful prompts
MULTIJAIL = SHARED_DATA / "multijail" / "MultiJail.csv"  # its English prompts are kept out of extra pairs

# name -> align overrides (on top of --config's align section)
CANDIDATES: dict[str, dict] = {
    "sft_30": {"method": "sft", "learning_rate": 2e-5, "max_steps": 30},  # the recipe before issue 10's tuning
    "sft_15": {"method": "sft", "learning_rate": 2e-5, "max_steps": 15},
    "dpo_12": {"method": "dpo", "beta": 0.1, "learning_rate": 5e-5, "max_steps": 12},
    "dpo_sft_12": {"method": "dpo", "beta": 0.1, "learning_rate": 5e-5, "max_steps": 12, "sft_weight": 1.0},
    "dpo_12_lr1e-4": {"method": "dpo", "beta": 0.1, "learning_rate": 1e-4, "max_steps": 12},
    "dpo_12_b05": {"method": "dpo", "beta": 0.5, "learning_rate": 5e-5, "max_steps": 12},
    # longer or stronger DPO (save_steps = max_steps: one checkpoint, as the default recipe writes)
    "dpo_24": {"method": "dpo", "beta": 0.1, "learning_rate": 5e-5, "max_steps": 24, "save_steps": 24},
    "dpo_36": {"method": "dpo", "beta": 0.1, "learning_rate": 5e-5, "max_steps": 36, "save_steps": 36},
    "dpo_24_lr1e-4": {"method": "dpo", "beta": 0.1, "learning_rate": 1e-4, "max_steps": 24, "save_steps": 24},
    "dpo_sft_24": {"method": "dpo", "beta": 0.1, "learning_rate": 5e-5, "max_steps": 24, "save_steps": 24,
                   "sft_weight": 1.0},
    # + the MPO paper's English pairs (align.extra_pairs): about 45 + 97 rows, each seen about once at batch 8
    "dpo_extra_18": {"method": "dpo", "beta": 0.1, "learning_rate": 5e-5, "max_steps": 18, "save_steps": 18,
                     "extra_pairs": MPO_PAIRS},
    "dpo_extra_18_lr1e-4": {"method": "dpo", "beta": 0.1, "learning_rate": 1e-4, "max_steps": 18,
                            "save_steps": 18, "extra_pairs": MPO_PAIRS},
}
METRICS = ("asr", "over_refusal", "selectivity", "response_lang_share")
SMOKE = {"candidates": ["dpo_12"], "max_steps": 1, "prompts_per_kind": 2,
         "out": str(ROOT / "runs" / "align_select-smoke")}
SMOKE_OVERRIDES = ["run.target_langs=[zh]", "align.answer_max_new_tokens=4", "evaluate.max_new_tokens=4",
                   "evaluate.bootstrap_samples=10"]


def own_answers_cached(config: PipelineConfig, prompts: list[dict], cache: Path) -> dict[str, str]:
    """The starting model's greedy answers by prompt id, from ``cache`` when it holds them all."""
    from mpo_core.training.align_data import own_answers

    key = f"{config.model.name_or_path}|{config.align.answer_max_new_tokens}"
    stored = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
    answers = stored.get(key, {})
    missing = [p for p in prompts if p["prompt_id"] not in answers]
    if missing:
        answers.update(own_answers(config, missing))
        cache.write_text(json.dumps({**stored, key: answers}, ensure_ascii=False, indent=1), encoding="utf-8")
    return answers


def train_candidate(config: PipelineConfig, harmful: list[dict], benign: list[dict], answers: dict[str, str],
                    out_dir: Path) -> tuple[Path, dict[str, int], float]:
    """Align ``config.model`` on ``harmful``/``benign`` as the align stage does; (model, row counts, seconds)."""
    is_refusal = refusal_check(config.run.dominant_lang)
    rows, counts = build_align_rows(harmful, benign, answers, load_refusals(config.align.refusals),
                                    config.align.method, is_refusal=is_refusal, seed=config.run.seed)
    extra_rows, extra_counts = extra_align_rows(config, is_refusal, [MULTIJAIL] if MULTIJAIL.is_file() else [])
    rows += extra_rows
    counts = {**counts, **{f"extra_{k}": v for k, v in extra_counts.items()}}
    start = time.perf_counter()
    model = fit(align_train_config(config), config.model, pa.Table.from_pylist(rows), None, out_dir, {})
    return model, counts, time.perf_counter() - start


def measure(config: PipelineConfig, model: Path, name: str, prompts: list[dict]) -> tuple[list[dict], list[dict]]:
    """Summary rows (ASR, over-refusal, selectivity, response-language share) of ``model`` on ``prompts``, and
    its judged responses."""
    prompt_set = PromptSet("seed", [{"prompt_id": p["prompt_id"], "lang": p["lang"], "text": p["text"],
                                     "harmful": p["harmful"]} for p in prompts])
    model_cfg = config.model.model_copy(update={"name_or_path": str(model)})
    obs = evaluate_model(model_cfg, config, role=name, safety_sets=[prompt_set])
    responses = [{k: r[k] for k in ("prompt_id", "lang", "prompt", "text", "verdict")} for r in obs.responses]
    return [r for r in summary_rows(obs, config) if r["metric"] in METRICS], responses


def _cell(rows: list[dict], lang: str, metric: str) -> str:
    for r in rows:
        if r["lang"] == lang and r["metric"] == metric:
            return f"{r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] n={r['n']}"
    return "-"


def table(results: dict[str, list[dict]], langs: list[str]) -> str:
    lines = ["| candidate | lang | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for name, rows in results.items():
        for lang in langs:
            lines.append(f"| {name} | {lang} | " + " | ".join(_cell(rows, lang, m) for m in METRICS) + " |")
    return "\n".join(lines)


def _value(rows: list[dict], lang: str, metric: str) -> float:
    values = [r["value"] for r in rows if r["lang"] == lang and r["metric"] == metric and r["value"] is not None]
    return float(values[0]) if values else math.nan


def summary_line(results: dict[str, list[dict]], lang: str, seconds: float) -> str:
    """The last line: the candidate of ``results`` with the highest selectivity in ``lang`` and its figures."""
    def selectivity(name: str) -> float:
        value = _value(results[name], lang, "selectivity")
        return value if math.isfinite(value) else -math.inf

    best = max(results, key=selectivity)
    figures = " ".join(f"best_{m}={_value(results[best], lang, m):.3f}" for m in ("asr", "over_refusal", "selectivity"))
    return f"align_select_seconds={seconds:.1f} candidates={len(results)} best={best} {figures}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "align_select"))
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES),
                        help=f"validation candidates ('none' for no validation run); known: {list(CANDIDATES)}")
    parser.add_argument("--holdout", nargs="*", default=[], help="candidates measured once on the hold-out")
    parser.add_argument("--keep-models", action="store_true", help="keep the trained checkpoints")
    parser.add_argument("--max-steps", type=int, help="cap every candidate's align.max_steps (and save_steps)")
    parser.add_argument("--prompts-per-kind", type=int,
                        help="only the first N harmful and N benign prompts (train split; hold-out per language)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. align.max_length=96")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes for CI: {SMOKE}, {SMOKE_OVERRIDES}")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
        args.overrides = SMOKE_OVERRIDES + args.overrides
    started = time.perf_counter()

    def first(rows: list[dict]) -> list[dict]:
        if args.prompts_per_kind is None:
            return rows
        seen: dict[tuple[str, bool], int] = {}
        kept = []
        for r in rows:
            key = (r["lang"], r["harmful"])
            if seen.get(key, 0) < args.prompts_per_kind:
                kept.append(r)
                seen[key] = seen.get(key, 0) + 1
        return kept

    def candidate(name: str) -> dict:
        steps = {"max_steps": args.max_steps, "save_steps": args.max_steps} if args.max_steps else {}
        return {**CANDIDATES[name], **steps}

    base = load_config(args.config, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lang = base.run.dominant_lang
    train = first([r for r in load_seed_prompts() if r["lang"] == lang and r["split"] == "train"])
    harmful, benign = [r for r in train if r["harmful"]], [r for r in train if not r["harmful"]]
    answers = own_answers_cached(base, harmful + benign, out / "answers.json")

    def run(name: str, fit_harmful: list[dict], fit_benign: list[dict], prompts: list[dict], tag: str) -> list[dict]:
        config = base.model_copy(update={"align": base.align.model_copy(update=candidate(name))})
        model_dir = out / f"{tag}-{name}"
        shutil.rmtree(model_dir, ignore_errors=True)
        model, counts, seconds = train_candidate(config, fit_harmful, fit_benign, answers, model_dir)
        rows, responses = measure(config, model, name, prompts)
        record = {"candidate": name, "align": candidate(name), "rows": counts, "train_seconds": round(seconds, 1),
                  "summary": rows, "responses": responses}
        (out / f"{tag}-{name}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        print(f"{tag} {name}: rows {counts}, trained in {seconds:.0f} s", flush=True)
        if not args.keep_models:
            shutil.rmtree(model_dir, ignore_errors=True)
        return rows

    names = [n for n in args.candidates if n != "none"]
    results: dict[str, list[dict]] = {}
    if names:
        (fit_harmful, fit_benign), (val_harmful, val_benign) = validation_split(harmful, benign)
        results = {n: run(n, fit_harmful, fit_benign, val_harmful + val_benign, "val") for n in names}
        print(f"\nValidation ({len(val_harmful)} harmful + {len(val_benign)} benign {lang} train-split prompts "
              f"kept out of align; trained on {len(fit_harmful)} + {len(fit_benign)}):\n")
        print(table(results, [lang]))
    if args.holdout:
        holdout = first([r for r in seed_holdout(None) if r["lang"] in (lang, *base.run.target_langs)])
        results = {n: run(n, harmful, benign, holdout, "holdout") for n in args.holdout}
        print("\nSeed hold-out (measured once per recipe, trained on the whole train split):\n")
        print(table(results, [lang, *base.run.target_langs]))
    if results:
        print(summary_line(results, lang, time.perf_counter() - started))


if __name__ == "__main__":
    main()

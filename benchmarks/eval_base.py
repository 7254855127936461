"""Evaluate a base model alone (no training): the seed hold-out in every seed language, MultiJail in
en/zh/ko/ar/bn/sw, reward gaps on the paper's released pairs, and a few MGSM items per language.

Defaults: the embedded default model on CPU, greedy decoding of 48 new tokens, the refusal-pattern judge,
real data from ``../shared/data``. Writes ``eval.parquet``, the judged responses and ``report/`` into
``--out`` and prints the overview table (Markdown) and the time taken. Example::

    python benchmarks/eval_base.py --multijail-per-lang 50 --pairs-per-lang 8 generate.batch_size=64

``--smoke`` (what CI runs, ``tests/test_benchmarks.py``): English and Chinese only, one prompt per set and
language, one pair per language, 4 new tokens, 10 bootstrap samples, into ``runs/eval_base-smoke``; flags
and overrides given beside it still win.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mpo_core.evaluation.compare import evaluate_models, write_evaluation
from mpo_core.plumbing.config import load_config, section_hash
from mpo_core.results.report import markdown_tables

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
SMOKE = {"multijail_per_lang": 1, "pairs_per_lang": 1, "max_length": 64, "max_new_tokens": 4,
         "out": str(ROOT / "runs" / "eval_base-smoke")}
SMOKE_OVERRIDES = ["evaluate.langs=[en,zh]", "evaluate.bootstrap_samples=10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "eval_base"))
    parser.add_argument("--no-seed", action="store_true", help="skip the seed hold-out")
    parser.add_argument("--multijail", default=str(SHARED / "multijail" / "MultiJail.csv"),
                        help="MultiJail CSV ('' to skip)")
    parser.add_argument("--multijail-per-lang", type=int, default=50)
    parser.add_argument("--pairs", default=str(SHARED / "mpo_official" / "llama_mpo_data.json"),
                        help="held-out pairs for reward gaps ('' to skip)")
    parser.add_argument("--pairs-per-lang", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256, help="token limit of a pair sequence")
    parser.add_argument("--mgsm", default=str(SHARED / "mgsm"), help="MGSM folder")
    parser.add_argument("--mgsm-per-lang", type=int, default=0, help="MGSM items per language (0: skip)")
    parser.add_argument("--mgsm-max-new-tokens", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("overrides", nargs="*", help="extra config overrides, key.sub=value")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes for CI: {SMOKE}, {SMOKE_OVERRIDES}")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
        args.overrides = SMOKE_OVERRIDES + args.overrides

    safety_sets = ([] if args.no_seed else ["seed"]) + ([f"'{args.multijail}'"] if args.multijail else [])
    overrides = [
        f"evaluate.safety_sets=[{', '.join(safety_sets)}]",
        f"evaluate.max_prompts_per_lang={args.multijail_per_lang}",
        f"evaluate.max_new_tokens={args.max_new_tokens}",
        f"evaluate.max_pairs_per_lang={args.pairs_per_lang}",
        f"evaluate.max_length={args.max_length}",
        f"evaluate.mgsm_max_new_tokens={args.mgsm_max_new_tokens}",
    ]
    if args.pairs:
        overrides.append(f"evaluate.pairs='{args.pairs}'")
    if args.mgsm and args.mgsm_per_lang > 0:
        overrides += [f"evaluate.mgsm=['{args.mgsm}']", f"evaluate.mgsm_max_per_lang={args.mgsm_per_lang}"]
    config = load_config(args.config, overrides + args.overrides)
    models = {"base": config.model}

    started = time.perf_counter()
    result = evaluate_models(config, models)
    paths = write_evaluation(result, config, models, args.out,
                             config_hash=section_hash(config, "model", "generate", "label", "evaluate"))
    seconds = time.perf_counter() - started

    tables = markdown_tables(result.rows)
    print(tables["overview"])
    print()
    for name, path in paths.items():
        print(f"{name}: {path}")
    generated = sum(len(obs.responses) for obs in result.observations.values())
    print(f"eval_base_seconds={seconds:.1f} responses={generated} datasets={result.datasets}")


if __name__ == "__main__":
    main()

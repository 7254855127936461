"""MPO against DPO, SimPO, IPO and SFT, with clean and noisy target labels, from one aligned reference.

Runs the ``mpo-transfer-sweep`` flow (:mod:`flows.transfer`): method x target label noise x seed, every cell
a pipeline run on the same pairs (noise aside) with the same step budget, sharing align, generation,
judging, pairs and the reference. Then writes into ``runs/<name>/transfer/``: ``transfer.md`` (the table
method x noise x language with intervals, the setting, per-stage times, and as its last line the headline),
``transfer.png`` (mean target ASR and over-refusal against noise), ``cells.json``. The headline is also the
last line printed::

    mpo_drop_clean=<a> dpo_drop_clean=<b> mpo_drop_noisy=<c> dpo_drop_noisy=<d> english_change_mpo=<e> ...

The shared align adds the paper's English pairs (``--align-extra-pairs``, docs/experiments.md "English align with the paper's pairs"): the
recipe that makes English safer than its targets, so there is something to transfer.

Evaluation (held out, greedy, the recipe's judge): the seed hold-out (harmful and benign) and MultiJail
harmful prompts, per language; ``ja`` is not among the default target languages here because MultiJail has
no Japanese (it would get fewer than 20 harmful prompts). Budget: see docs/experiments.md for the measured
per-stage times the defaults are sized from; scale up with the flags or ``key=value`` overrides, e.g.
``--seeds 0 1 2 --train-steps 48 prompts.limit=90``.

``--smoke`` (what CI runs, ``tests/test_benchmarks.py``): one cell (MPO, clean labels, seed 0), Chinese only,
6 seed prompts, one MultiJail prompt per language, one align step (on 2 harmful, 2 benign prompts and 2 of
the paper's pairs) and one training step, 4-token answers,
into ``runs/transfer-smoke``: the whole sweep's code path in a few minutes, not its figures; flags and
overrides given beside it still win.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from mpo_core.plumbing.artifacts import read_artifact, read_manifest
from mpo_core.plumbing.config import CONFIGS_DIR, load_config
from mpo_core.plumbing.runs import RunFolder
from mpo_core.plumbing.sweep import (
    DEFAULT_METHODS,
    DEFAULT_NOISE,
    DEFAULT_SEEDS,
    METHOD_OVERRIDES,
    SHARED_RUN,
    Cell,
    runs_root,
    sweep_cells,
)
from mpo_core.results.transfer import (
    ceiling,
    collect,
    headline,
    headline_line,
    markdown_table,
    plot_target_asr,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CELLS = sweep_cells(DEFAULT_METHODS, DEFAULT_NOISE, DEFAULT_SEEDS)
SHARED = ROOT.parent / "shared" / "data"
SMOKE = {"name": "transfer-smoke", "methods": ["mpo"], "noise": [0.0], "seeds": [0], "target_langs": "zh",
         "prompts_limit": 6, "multijail_per_lang": 1, "train_steps": 1, "eval_tokens": 4, "align_steps": 1}
SMOKE_OVERRIDES = [  # short sequences; an align of one step leaves English unsafe: train on every pair anyway
    "align.max_harmful=2", "align.max_benign=2", "align.max_extra_pairs=2", "align.per_device_batch_size=2",
    "align.answer_max_new_tokens=4", "generate.max_new_tokens=4", "reference.max_length=64",
    "reference.min_safe_share=0.0", "reference.drop_unsafe_pairs=false", "train.max_length=64",
    "evaluate.max_length=64", "evaluate.max_pairs_per_lang=1", "evaluate.bootstrap_samples=10",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIGS_DIR / "default.yaml"))
    parser.add_argument("--name", default="transfer", help="sweep folder runs/<name>")
    parser.add_argument("--root", default=str(ROOT / "runs"))
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--noise", nargs="+", type=float, default=DEFAULT_NOISE)
    parser.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS)
    parser.add_argument("--target-langs", default="zh,ko,ar,bn,sw")
    parser.add_argument("--prompts-limit", type=int, default=36,
                        help="seed prompt ids (half harmful): 36 = 12 train + 6 held-out harmful, 6 held-out benign")
    parser.add_argument("--multijail", default=str(SHARED / "multijail" / "MultiJail.csv"))
    parser.add_argument("--multijail-per-lang", type=int, default=14,
                        help="MultiJail harmful prompts per language (with 6 seed hold-out ones: 20)")
    parser.add_argument("--train-steps", type=int, default=8, help="optimizer steps per cell (batch 2)")
    parser.add_argument("--eval-tokens", type=int, default=12,
                        help="greedy tokens per evaluation answer (a refusal shows in the first few)")
    parser.add_argument("--align-extra-pairs", default=str(SHARED / "mpo_official" / "llama_mpo_data.json"),
                        help="align.extra_pairs of the shared align (the paper's English pairs: the recipe that "
                             "makes English safe, docs/experiments.md); '' for the default recipe's")
    parser.add_argument("--align-steps", type=int, default=18,
                        help="align.max_steps with --align-extra-pairs (each of about 140 rows seen once at batch 8)")
    parser.add_argument("--workers", type=int, default=1,
                        help="lanes of cells side by side, each stage in its own process (1: in this process; "
                             "2 lanes on 2 cores measured no faster, docs/experiments.md)")
    parser.add_argument("--method-override", nargs=2, action="append", default=[], metavar=("METHOD", "KEY=VALUE"),
                        help="an override for one method's cells (repeatable); a method named here drops its "
                             "defaults (each baseline's own beta, mpo_core.plumbing.sweep.METHOD_OVERRIDES)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, key.sub=value")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes for CI: {SMOKE}, {SMOKE_OVERRIDES}")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
        args.overrides = SMOKE_OVERRIDES + args.overrides
    unknown = sorted({method for method, _ in args.method_override} - set(DEFAULT_METHODS))
    if unknown:
        parser.error(f"--method-override names {unknown}; the methods are {DEFAULT_METHODS}")
    return args


def sweep_overrides(args: argparse.Namespace) -> list[str]:
    """The recipe's changes for the benchmark: languages, set sizes, step budget, evaluation sets."""
    safety_sets = ["seed"] + ([f"'{args.multijail}'"] if args.multijail else [])
    align = ([f"align.extra_pairs='{args.align_extra_pairs}'", f"align.max_steps={args.align_steps}",
              f"align.save_steps={args.align_steps}"] if args.align_extra_pairs else [])
    return [
        *align,
        f"run.target_langs=[{args.target_langs}]",
        f"prompts.limit={args.prompts_limit}",
        f"train.max_steps={args.train_steps}",
        "train.save_steps=100000",  # only the last step's checkpoint (1.6 GB), which the sweep prunes
        f"evaluate.safety_sets=[{', '.join(safety_sets)}]",
        f"evaluate.max_prompts_per_lang={args.multijail_per_lang}",
        f"evaluate.max_new_tokens={args.eval_tokens}",
        *args.overrides,
    ]


def method_overrides(args: argparse.Namespace) -> dict[str, list[str]]:
    """:data:`METHOD_OVERRIDES`, the methods named by ``--method-override`` replaced by what it gives them."""
    given: dict[str, list[str]] = {}
    for method, override in args.method_override:
        given.setdefault(method, []).append(override)
    return {**METHOD_OVERRIDES, **given}


def stage_seconds(runs_dir: Path) -> dict[str, dict[str, float]]:
    """Per run, the seconds of every stage that ran (not skipped) in its latest invocation."""
    out = {}
    for folder in sorted(p for p in runs_dir.iterdir() if (p / "state.json").is_file()):
        stages = RunFolder(folder).read_state()["stages"]
        out[folder.name] = {s: round(e.get("seconds", 0.0), 1) for s, e in stages.items() if e.get("status") == "ran"}
    return out


def timing_lines(seconds: dict[str, dict[str, float]]) -> list[str]:
    """Shared-stage times and the mean per cell of train and evaluate."""
    lines = [f"- shared run: {seconds.get(SHARED_RUN, {})}"]
    for stage in ("pair", "filter", "reference", "train", "evaluate"):
        values = [s[stage] for run, s in seconds.items() if run != SHARED_RUN and stage in s]
        if values:
            lines.append(f"- {stage}: ran in {len(values)} other runs, mean {sum(values) / len(values):.1f} s")
    return lines


def projection_line(seconds: dict[str, dict[str, float]], wall: float, full_cells: int, full_pairs_runs: int,
                    workers: int) -> str:
    """The measured cost per cell (train + evaluate) and per pairs run (pair + filter), the rest of the wall
    time (shared stages, the starting models' evaluation, Prefect, lanes waiting for each other), and what
    ``full_cells`` cells in ``workers`` lanes and ``full_pairs_runs`` pairs runs would take at the same load:
    how the defaults are sized."""
    cells = [s for run, s in seconds.items() if "train" in s]
    pairs_runs = [s for run, s in seconds.items() if run.startswith("pairs-")]
    per_cell = sum(s.get("train", 0.0) + s.get("evaluate", 0.0) for s in cells) / max(len(cells), 1)
    per_pairs = sum(s.get("pair", 0.0) + s.get("filter", 0.0) for s in pairs_runs) / max(len(pairs_runs), 1)
    lanes = min(workers, max(len(cells), 1))
    rest = wall - per_cell * len(cells) / lanes - per_pairs * len(pairs_runs)
    full = rest + per_cell * full_cells / min(workers, full_cells) + per_pairs * full_pairs_runs
    return (f"- cost: {per_cell:.0f} s per cell (train + evaluate, mean of {len(cells)}; {lanes} lane(s) side by "
            f"side), {per_pairs:.0f} s per pairs run, {rest:.0f} s for the rest (shared stages, starting models' "
            f"evaluation, Prefect); {full_cells} cells in {min(workers, full_cells)} lane(s) and {full_pairs_runs} "
            f"pairs runs would take about {full / 60:.0f} min at this load")


def noise_lines(runs_dir: Path) -> list[str]:
    """Per pairs run, how many target pairs the pair stage flipped and how many flipped pairs the filter kept
    (small sets: ``round(noise * n)`` per language can be 0)."""
    lines = []
    for folder in sorted(runs_dir.iterdir()):
        pairs, filtered = folder / "pair" / "pairs.parquet", folder / "filter" / "filtered.parquet"
        if not pairs.is_file() or not filtered.is_file():
            continue
        noise = read_manifest(pairs).extra.get("label_noise", {})
        kept = read_artifact(filtered, "pairs").column("target_flipped").to_pylist()
        lines.append(f"- `{folder.name}`: {noise.get('flipped')} of {noise.get('pairs')} target pairs flipped "
                     f"(noise {noise.get('fraction')}, seed {noise.get('seed')}); after the filter "
                     f"{sum(bool(k) for k in kept)} of {len(kept)} kept pairs are flipped (held-out pairs included: "
                     "training leaves them out, evaluation reads them with their true labels)")
    return lines


def write_outputs(sweep_dir: Path, results, figures: dict, meta: list[str]) -> Path:
    out = sweep_dir / "transfer"
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_target_asr(results, out / "transfer.png")
    text = "\n".join(["# Transfer: MPO against its baselines, clean and noisy target labels", "", *meta, "",
                      markdown_table(results), "", f"![target ASR and over-refusal]({plot.name})", "",
                      headline_line(figures)])
    path = out / "transfer.md"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    from flows.transfer import transfer_sweep

    args = parse_args(argv)
    sweep_dir = Path(args.root) / args.name
    overrides = sweep_overrides(args)
    config = load_config(args.config, overrides)
    per_method = method_overrides(args)
    betas = ", ".join(f"{m} {load_config(args.config, overrides + Cell(m, 0.0, 0).overrides(per_method)).train.beta}"
                      for m in args.methods if m != "sft")
    started = time.perf_counter()
    evals = transfer_sweep(sweep_dir=str(sweep_dir), config=args.config, overrides=overrides,
                           methods=args.methods, noise_levels=args.noise, seeds=args.seeds, workers=args.workers,
                           method_overrides=per_method)
    wall = time.perf_counter() - started

    cells = {(c.method, c.noise, c.seed): read_artifact(evals[c.name], "eval").to_pylist()
             for c in sweep_cells(args.methods, args.noise, args.seeds)}
    starting = read_artifact(evals["starting"], "eval").to_pylist()
    results = collect(starting, cells, beta=config.train.beta, dominant_lang=config.run.dominant_lang,
                      target_langs=list(config.run.target_langs), num_samples=config.evaluate.bootstrap_samples,
                      seed=config.run.seed)
    figures = headline(results)
    judges = sorted({f"{r['metric']}: {r['judge']}" for r in starting if r["judge"]})
    sizes = sorted({f"{r['lang']}/{r['metric']}/{r['dataset']}: n={r['n']}" for r in starting
                    if r["model"] == "base" and r["metric"] in ("asr", "over_refusal", "reward_gap")})
    load = os.getloadavg()
    extra = f", + the English pairs of {Path(config.align.extra_pairs).name}" if config.align.extra_pairs else ""
    align = (f"{config.align.method}, {config.align.max_steps} steps, lr {config.align.learning_rate}{extra}"
             if config.align.enabled else "off")
    meta = [
        (f"- cells: methods {args.methods} x noise {args.noise} x seeds {args.seeds} "
        f"({len(cells)} pipeline runs under `{runs_root(sweep_dir)}`, in {min(args.workers, len(cells))} lane(s))"),
        (f"- step budget per cell: train.max_steps={config.train.max_steps}, batch "
        f"{config.train.per_device_batch_size}, lr {config.train.learning_rate}, beta: {betas}; "
        f"align (once, shared): {align}"),
        (f"- transfer ceiling {ceiling(results):.3f}: the mean target ASR drop if every target language became "
        f"exactly as safe as {config.run.dominant_lang} in the starting model (mean over targets of "
        f"max(0, ASR_t - ASR_{config.run.dominant_lang})); no drop by transfer exceeds it"),
        f"- judges: {'; '.join(judges)}",
        f"- evaluation sets per model (n per language): {'; '.join(sizes)}",
        ("- intervals: rates pool every prompt of every seed (percentile bootstrap); RG^t averages the seeds' "
        "values and bounds; abs(beta*RG^t - RG^d) is taken on the language means, with MPO's beta for every method"),
        (f"- wall time {wall:.0f} s; load average at the end {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} "
        f"on {os.cpu_count()} cores"),
        "- label noise as applied:",
        *noise_lines(runs_root(sweep_dir)),
        "- seconds per stage where it ran:",
        *timing_lines(stage_seconds(runs_root(sweep_dir))),
        projection_line(stage_seconds(runs_root(sweep_dir)), wall, len(DEFAULT_CELLS),
                        len({c.pairs_run for c in DEFAULT_CELLS} - {SHARED_RUN}), args.workers),
    ]
    path = write_outputs(sweep_dir, results, figures, meta)
    (sweep_dir / "transfer" / "cells.json").write_text(
        json.dumps({"evals": evals, "figures": figures}, indent=2, default=str), encoding="utf-8")
    print(path.read_text(encoding="utf-8").rstrip("\n").rsplit("\n", 1)[0])
    print(headline_line(figures))


if __name__ == "__main__":
    main()

"""What a transfer sweep measured: one table method x noise x language, a plot, and the headline line.

Inputs are ``eval`` rows: the starting models' (``base`` = the model training starts from, ``raw`` where an
``align`` stage ran) evaluated once by :func:`evaluate_starting_models`, and each cell's ``trained`` rows.
Per (method, noise, language), pooled over seeds and safety data sets:

- rates (``asr``, ``over_refusal``, ``response_lang_share``): the share over every judged prompt of every
  seed, with the percentile-bootstrap interval of that share (as the report's);
- ``selectivity`` = refusal rate on harmful - refusal rate on benign prompts: the eval rows' own where the
  evaluation wrote them, else ``(1 - ASR) - over_refusal`` (the two agree under the refusal-pattern judge);
- ``reward_gap`` RG^t on held-out pairs (true labels) and ``|beta*RG^t - RG^d|`` against the reference's RG^d
  of the same pairs: means over seeds, with the mean of the seeds' interval bounds.

The last line (:func:`headline`): ``drop`` = starting target ASR - trained target ASR, averaged over target
languages (and seeds); ``noisy`` = 40 % noise; ``english_change_mpo`` = trained - starting English ASR and
``over_refusal_change_mpo`` = trained - starting target over-refusal, both for MPO at 0 % noise.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpo_core.plumbing.artifacts import artifact_is_complete, read_artifact, read_manifest
from mpo_core.plumbing.config import canonical_hash, section_hash
from mpo_core.plumbing.stage_run import starting_model
from mpo_core.plumbing.stage_table import input_hashes
from mpo_core.results.metrics import Estimate, bootstrap_mean_ci, transfer_ceiling

RATES = ("asr", "over_refusal", "response_lang_share")
STARTING_ROLE = "base"
NOISY = 0.4
COLUMNS = ("asr", "over_refusal", "selectivity", "response_lang_share", "reward_gap", "gap_to_reference")
HEADLINE_KEYS = ("mpo_drop_clean", "dpo_drop_clean", "mpo_drop_noisy", "dpo_drop_noisy",
                 "english_change_mpo", "over_refusal_change_mpo")


def _is_pairs(dataset: str) -> bool:
    return dataset.startswith("pairs:")


def pooled_rate(rows: list[dict], *, num_samples: int = 1000, seed: int = 0) -> Estimate | None:
    """A rate over the union of the items behind ``rows`` (each a share ``value`` of ``n`` 0/1 items)."""
    hits = sum(round(r["value"] * r["n"]) for r in rows)
    total = sum(r["n"] for r in rows)
    if total == 0:
        return None
    flags = np.zeros(total)
    flags[:hits] = 1.0
    return bootstrap_mean_ci(flags, num_samples=num_samples, seed=seed)


def mean_estimate(rows: list[dict]) -> Estimate | None:
    """Mean of ``rows``' values, interval = mean of their bounds (seeds of one cell)."""
    if not rows:
        return None
    lows = [r["ci_low"] for r in rows if r["ci_low"] is not None]
    highs = [r["ci_high"] for r in rows if r["ci_high"] is not None]
    return Estimate(
        float(np.mean([r["value"] for r in rows])),
        float(np.mean(lows)) if len(lows) == len(rows) else None,
        float(np.mean(highs)) if len(highs) == len(rows) else None,
        int(sum(r["n"] for r in rows)),
    )


def summarize_model(rows: Iterable[dict], beta: float, reference: Iterable[dict] = (), **bootstrap: Any
                    ) -> dict[str, dict[str, Estimate]]:
    """``{lang: {column: Estimate}}`` for the eval rows of one model (one role, any number of seeds)."""
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_key[(r["lang"], r["metric"])].append(r)
    ref_gap: dict[str, list[float]] = defaultdict(list)
    for r in reference:
        if r["metric"] == "reward_gap":
            ref_gap[r["lang"]].append(r["value"])
    out: dict[str, dict[str, Estimate]] = defaultdict(dict)
    for (lang, metric), group in by_key.items():
        safety = [r for r in group if not _is_pairs(r["dataset"])]
        if metric in RATES and safety:
            out[lang][metric] = pooled_rate(safety, **bootstrap)
        elif metric == "selectivity" and safety:
            out[lang][metric] = _weighted(safety)
        elif metric == "reward_gap":
            gap = mean_estimate([r for r in group if _is_pairs(r["dataset"])])
            if gap is None:
                continue
            out[lang]["reward_gap"] = gap
            if ref_gap.get(lang):
                distance = abs(beta * gap.value - float(np.mean(ref_gap[lang])))
                out[lang]["gap_to_reference"] = Estimate(distance, None, None, gap.n)
    for cols in out.values():
        if "selectivity" not in cols and "asr" in cols and "over_refusal" in cols:
            value = (1.0 - cols["asr"].value) - cols["over_refusal"].value
            cols["selectivity"] = Estimate(value, None, None, cols["asr"].n + cols["over_refusal"].n)
    return dict(out)


def _weighted(rows: list[dict]) -> Estimate:
    """n-weighted mean of values and of interval bounds (rows of several data sets or seeds)."""
    weights = np.array([r["n"] for r in rows], dtype=float)
    weights = weights / weights.sum() if weights.sum() else np.full(len(rows), 1.0 / len(rows))

    def avg(key: str) -> float | None:
        values = [r[key] for r in rows]
        return None if any(v is None for v in values) else float(np.dot(weights, values))

    return Estimate(avg("value"), avg("ci_low"), avg("ci_high"), int(sum(r["n"] for r in rows)))


@dataclass
class TransferResults:
    """Summaries of the starting models and of every (method, noise) cell, and the languages."""

    dominant_lang: str
    target_langs: list[str]
    starting: dict[str, dict[str, dict[str, Estimate]]]  # role -> lang -> column
    cells: dict[tuple[str, float], dict[str, dict[str, Estimate]]]  # (method, noise) -> lang -> column
    seeds: dict[tuple[str, float], list[int]]

    @property
    def langs(self) -> list[str]:
        return [self.dominant_lang, *self.target_langs]


def collect(starting_rows: list[dict], cell_rows: dict[tuple[str, float, int], list[dict]], *, beta: float,
            dominant_lang: str, target_langs: list[str], **bootstrap: Any) -> TransferResults:
    """Summaries from the starting evaluation's rows and each ``(method, noise, seed)`` cell's eval rows."""
    reference = [r for r in starting_rows if r["model"] == "reference"]
    roles = sorted({r["model"] for r in starting_rows} - {"reference", "delta"})
    starting = {role: summarize_model([r for r in starting_rows if r["model"] == role], beta, reference,
                                      **bootstrap) for role in roles}
    grouped: dict[tuple[str, float], list[dict]] = defaultdict(list)
    seeds: dict[tuple[str, float], list[int]] = defaultdict(list)
    for (method, noise, seed), rows in sorted(cell_rows.items()):
        grouped[(method, noise)] += [r for r in rows if r["model"] == "trained"]
        seeds[(method, noise)].append(seed)
    cells = {key: summarize_model(rows, beta, reference, **bootstrap) for key, rows in grouped.items()}
    return TransferResults(dominant_lang, list(target_langs), starting, cells, dict(seeds))


def _target_mean(summary: dict[str, dict[str, Estimate]], langs: list[str], column: str) -> float:
    values = [summary[lang][column].value for lang in langs if column in summary.get(lang, {})]
    return float(np.mean(values)) if values else math.nan


def headline(results: TransferResults) -> dict[str, float]:
    """The six figures of the last line (NaN where the sweep lacks the cell or the metric)."""
    start = results.starting.get(STARTING_ROLE, {})
    targets = results.target_langs

    def drop(method: str, noise: float) -> float:
        cell = results.cells.get((method, noise))
        if cell is None:
            return math.nan
        return _target_mean(start, targets, "asr") - _target_mean(cell, targets, "asr")

    mpo = results.cells.get(("mpo", 0.0), {})
    dominant = [results.dominant_lang]
    return {
        "mpo_drop_clean": drop("mpo", 0.0),
        "dpo_drop_clean": drop("dpo", 0.0),
        "mpo_drop_noisy": drop("mpo", NOISY),
        "dpo_drop_noisy": drop("dpo", NOISY),
        "english_change_mpo": _target_mean(mpo, dominant, "asr") - _target_mean(start, dominant, "asr")
        if mpo else math.nan,
        "over_refusal_change_mpo": _target_mean(mpo, targets, "over_refusal")
        - _target_mean(start, targets, "over_refusal") if mpo else math.nan,
    }


def ceiling(results: TransferResults) -> float:
    """:func:`transfer_ceiling` of the starting model: no method's drop can exceed it by transfer alone."""
    start = results.starting.get(STARTING_ROLE, {})

    def asr(lang: str) -> float:
        est = start.get(lang, {}).get("asr")
        return est.value if est is not None else math.nan

    return transfer_ceiling(asr(results.dominant_lang), [asr(t) for t in results.target_langs])


def headline_line(figures: dict[str, float]) -> str:
    """``mpo_drop_clean=<a> dpo_drop_clean=<b> ...`` with three decimals (``nan`` where absent)."""
    return " ".join(f"{key}={figures[key]:.3f}" for key in HEADLINE_KEYS)


def _fmt(est: Estimate | None) -> str:
    if est is None or est.value is None or not math.isfinite(est.value):
        return "–"
    if est.ci_low is None or est.ci_high is None:
        return f"{est.value:.3f}"
    return f"{est.value:.3f} [{est.ci_low:.3f}, {est.ci_high:.3f}]"


def markdown_table(results: TransferResults) -> str:
    """One row per (model, language): starting models first, then each method x noise."""
    header = ["model", "noise", "seeds", "lang", "ASR", "over-refusal", "selectivity", "resp. lang share",
              "RG^t", "abs(beta*RG^t - RG^d)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows: list[tuple[str, str, str, dict]] = [
        (role, "–", "–", summary) for role, summary in sorted(results.starting.items())
    ]
    rows += [(method, f"{noise:.0%}", ",".join(map(str, results.seeds[(method, noise)])), summary)
             for (method, noise), summary in sorted(results.cells.items())]
    for model, noise, seeds, summary in rows:
        for lang in results.langs:
            cols = summary.get(lang, {})
            lines.append("| " + " | ".join([model, noise, seeds, lang] + [_fmt(cols.get(c)) for c in COLUMNS])
                         + " |")
    return "\n".join(lines)


def plot_target_asr(results: TransferResults, path: Path) -> Path:
    """Mean target-language ASR per method against label noise, the starting model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, column, label in ((axes[0], "asr", "target ASR (lower is safer)"),
                              (axes[1], "over_refusal", "target over-refusal")):
        for method in sorted({m for m, _ in results.cells}):
            noises = sorted(n for m, n in results.cells if m == method)
            values = [_target_mean(results.cells[(method, n)], results.target_langs, column) for n in noises]
            ax.plot([100 * n for n in noises], values, marker="o", label=method)
        for role, summary in sorted(results.starting.items()):
            ax.axhline(_target_mean(summary, results.target_langs, column), linestyle="--", linewidth=1,
                       color="grey" if role == STARTING_ROLE else "silver", label=f"{role} (start)")
        ax.set_xlabel("target pairs with swapped labels (%)")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


def starting_models(config, outputs: dict[str, Path]) -> dict:
    """The models of a run before training, by role: ``base`` (the model training starts from: the aligned
    checkpoint when align ran, else ``config.model``) and, when align ran, ``raw`` (``config.model``)."""

    models = {"raw": config.model} if "aligned" in outputs else {}
    return models | {STARTING_ROLE: starting_model(config, outputs)}


def evaluate_starting_models(run, out_dir: Path) -> Path:
    """Evaluate the starting models of a run whose stages before ``train`` are complete (the sweep's shared
    run) on the evaluation sets its cells use; write ``eval.parquet`` and a report into ``out_dir``. Skipped
    when ``out_dir`` already holds the evaluation of the same config sections and inputs."""
    from mpo_core.evaluation.compare import evaluate_models, write_evaluation

    config = run.load_config()
    outputs = run.available_outputs()
    used = {k: outputs[k] for k in ("translated", "filtered", "reference", "aligned") if k in outputs}
    models = starting_models(config, outputs)
    inputs = input_hashes(used)
    identity = canonical_hash({"sections": section_hash(config, "run", "model", "generate", "label", "evaluate"),
                               "models": {r: m.model_dump(mode="json") for r, m in models.items()},
                               "inputs": inputs})
    eval_path = Path(out_dir) / "eval.parquet"
    if artifact_is_complete(eval_path) and read_manifest(eval_path).config_hash == identity:
        return eval_path
    kinds = {"translated": "prompts", "filtered": "pairs", "reference": "reference"}
    tables = {k: read_artifact(used[k], kind) for k, kind in kinds.items() if k in used}
    result = evaluate_models(config, models, **tables)
    return write_evaluation(result, config, models, out_dir, config_hash=identity, inputs=inputs)["eval"]

"""What a person monitoring a run wants from each stage, computed from the stage's artifacts.

Small tables (lists of dicts with plain numbers) and short texts, never the data itself. ``mpo_core`` imports
no Prefect: the orchestration layer publishes these as Prefect artifacts.

- evaluate: :func:`metrics_table` (per language and metric: base and trained with intervals, the paired
  delta, the reference's RG^d) and :func:`headline` (three lines: ASR, reward gap, over-refusal, base ->
  trained, mean over the target languages);
- train: :func:`training_curve` (one row per logged step), :func:`training_summary` (the last logged
  L1, L2, loss and per-language target gaps) and :func:`training_log_line` (what the trainer logs);
- filter: :func:`mpo_core.pairs.filter_report.reason_rows` (reason x language);
- reference: :func:`reference_gaps` (RG^d per target language and the share of safe dominant pairs,
  RG^d > 0, which is MPO's premise), as the reference manifest records them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from mpo_core.results.report import HEADLINE_METRICS, EvalView

SIGNIFICANT_DIGITS = 5
# Per-step training-log keys worth a column, in this order; per-language ``<key>/<lang>`` columns follow.
CURVE_KEYS = ("loss", "l1", "l2", "target_gap", "dominant_gap", "target_gap_accuracy", "learning_rate",
              "grad_norm")


def _num(x: Any) -> float | None:
    """A finite float to :data:`SIGNIFICANT_DIGITS` significant digits (a learning rate of 1e-7 stays), or None."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def metrics_table(eval_rows: pa.Table | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (language, metric, dataset) of the headline metrics: base and trained values with their
    interval, the paired delta (trained - base) with its interval, the reference's RG^d, and n."""
    view = EvalView.from_table(eval_rows)
    headline = {m for m, _, _ in HEADLINE_METRICS}
    rows = []
    for lang in view.langs():
        for metric, dataset in view.metric_keys():
            if metric not in headline:
                continue
            row: dict[str, Any] = {"lang": lang, "metric": metric, "dataset": dataset}
            for role in ("base", "trained", "delta", "reference"):
                cell = view.get(role, lang, metric, dataset)
                row[role] = _num(cell.value) if cell else None
                if role != "reference":
                    row[f"{role}_ci_low"] = _num(cell.ci_low) if cell else None
                    row[f"{role}_ci_high"] = _num(cell.ci_high) if cell else None
            cells = [view.get(role, lang, metric, dataset) for role in ("base", "trained", "reference")]
            if all(c is None for c in cells):
                continue
            row["n"] = max(c.n for c in cells if c is not None)
            rows.append(row)
    return rows


def _mean_over(view: EvalView, role: str, metric: str, langs: list[str]) -> float | None:
    """Mean of ``role``'s ``metric`` over ``langs`` (on the dataset covering most of them)."""
    datasets = sorted({k[3] for k in view.cells if k[0] == role and k[2] == metric})
    if not datasets:
        return None
    dataset = max(datasets, key=lambda d: sum(view.get(role, lang, metric, d) is not None for lang in langs))
    values = [c.value for lang in langs if (c := view.get(role, lang, metric, dataset)) is not None]
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _change(before: float | None, after: float | None) -> str:
    if before is None and after is None:
        return "not measured"
    if after is None:
        return f"{before:.3f}"
    if before is None:
        return f"{after:.3f}"
    return f"{before:.3f} -> {after:.3f} ({after - before:+.3f})"


def headline(eval_rows: pa.Table | Iterable[dict[str, Any]], dominant_lang: str) -> list[str]:
    """Three lines: ASR, reward gap RG^t and over-refusal, base -> trained, mean over target languages."""
    view = EvalView.from_table(eval_rows)
    targets = [lang for lang in view.langs() if lang != dominant_lang] or view.langs()
    where = f"mean over {', '.join(targets)}"
    lines = []
    for metric, label in (("asr", "Attack success rate"), ("reward_gap", "Reward gap RG^t"),
                          ("over_refusal", "Over-refusal")):
        text = _change(_mean_over(view, "base", metric, targets), _mean_over(view, "trained", metric, targets))
        if metric == "reward_gap" and (ref := _mean_over(view, "reference", metric, [dominant_lang])) is not None:
            text += f"; reference RG^d ({dominant_lang}) {ref:+.3f}"
        lines.append(f"{label} ({where}): {text}")
    return lines


def read_log_history(path: str | Path) -> list[dict[str, Any]]:
    """The trainer's log history saved beside a trained model (``log_history.json``, a list of what the
    trainer logged, each with its ``step``); [] when there is none."""
    path = Path(path)
    if not path.exists():
        return []
    return json.loads(path.read_text(encoding="utf-8"))


def training_curve(log: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged training step (the entries with a ``loss``): step, epoch, the :data:`CURVE_KEYS`
    present and the per-language ``target_gap/<lang>`` columns."""
    rows = []
    for line in log:
        if "loss" not in line or "step" not in line:
            continue
        row: dict[str, Any] = {"step": int(line["step"]), "epoch": _num(line.get("epoch"))}
        row.update({key: _num(line[key]) for key in CURVE_KEYS if key in line})
        row.update({key: _num(value) for key, value in sorted(line.items()) if key.startswith("target_gap/")})
        rows.append(row)
    return rows


def training_summary(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """The last logged step's loss, L1, L2 and target gaps (overall and per language); {} before any step."""
    if not curve:
        return {}
    last = curve[-1]
    keys = ("step", "loss", "l1", "l2", "target_gap", "dominant_gap")
    summary = {key: last[key] for key in keys if key in last}
    summary.update({key: value for key, value in last.items() if key.startswith("target_gap/")})
    return summary


def training_log_line(logs: dict[str, Any], step: int, max_steps: int) -> str:
    """One line of the training log as a person reads it: step, loss, L1, L2, RG^t overall and per language."""
    parts = [f"step {step}/{max_steps}"]
    labels = {"loss": "loss", "l1": "L1", "l2": "L2", "target_gap": "RG^t", "dominant_gap": "RG^d",
              "learning_rate": "lr"}
    for key, label in labels.items():
        if key in logs and logs[key] is not None:
            parts.append(f"{label} {logs[key]:.3g}" if key == "learning_rate" else f"{label} {logs[key]:.4f}")
    per_lang = {k.split("/", 1)[1]: v for k, v in sorted(logs.items()) if k.startswith("target_gap/")}
    if per_lang:
        parts.append("RG^t by language " + ", ".join(f"{lang} {v:+.3f}" for lang, v in per_lang.items()))
    return " | ".join(parts)


def reference_gaps(premise: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Table rows of the reference's RG^d per target language, from the stats its manifest records
    (``premise``, :func:`mpo_core.method.premise.reference_gap_stats`): pairs, mean, min, max and the share of safe
    dominant pairs (RG^d > 0); ``all`` last. Languages without pairs are left out."""
    rows = [
        {"target_lang": lang, "pairs": s["n"], "mean_rg_d": _num(s["mean_reward_gap"]),
         "min_rg_d": _num(s.get("min_reward_gap")), "max_rg_d": _num(s.get("max_reward_gap")),
         "safe_share": _num(s["safe_share"])}
        for lang, s in premise.items() if s["n"]
    ]
    return sorted(rows, key=lambda row: row["target_lang"] == "all")


def plot_training_curve(curve: list[dict[str, Any]]) -> bytes | None:
    """PNG of the training curve: loss, L1 and L2 (left), mean and per-language RG^t (right), by step."""
    if not curve:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("loss", "loss"), ("l1", "L1"), ("l2", "L2")):
        if any(row.get(key) is not None for row in curve):
            left.plot(steps, [row.get(key) for row in curve], marker="o", ms=3, label=label)
    left.set(xlabel="step", title="loss")
    gap_keys = ["target_gap"] + sorted({k for row in curve for k in row if k.startswith("target_gap/")})
    for key in gap_keys:
        if any(row.get(key) is not None for row in curve):
            right.plot(steps, [row.get(key) for row in curve], marker="o", ms=3,
                       lw=2.5 if key == "target_gap" else 1, label="mean" if key == "target_gap" else key[11:])
    right.axhline(0.0, color="#888", lw=0.8)
    right.set(xlabel="step", title="target reward gap RG^t")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()

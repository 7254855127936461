"""The report's sentences: whether safety transferred (and the transfer ceiling), the target languages'
means, the supply of pairs, the training curve, and how the models came to be (align, MPO's premise).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mpo_core.method.premise import held_out_prompt_ids
from mpo_core.pairs.supply import pair_supply
from mpo_core.plumbing.artifacts import read_artifact, read_manifest
from mpo_core.plumbing.config import PipelineConfig
from mpo_core.results.metrics import (
    transfer_ceiling,
)
from mpo_core.results.stage_results import read_log_history, training_curve
from mpo_core.training.checkpoints import LOG_HISTORY, TRAIN_INFO, align_record


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
            "language first (docs/experiments.md, 'Choosing the align recipe').")


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

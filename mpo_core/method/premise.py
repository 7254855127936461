"""MPO's premise, checked: the reference prefers the safe answer in the dominant language (RG^d > 0).

L1 pulls every target gap toward ``RG^d / beta``. Where the frozen reference prefers the unsafe dominant answer
(``RG^d <= 0``), MPO teaches the target language to prefer the unsafe answer too: it transfers unsafety. So:

- :func:`reference_gap_stats` gives, per target language, the mean RG^d and the share of pairs with
  RG^d > 0; the reference stage records it in its manifest (``premise``) and the report shows it.
- :func:`check_premise` is the guard the train stage runs before MPO training: below
  ``reference.min_safe_share`` it stops with :class:`UnsafeReferenceError`, saying what it found and what to do.
- :func:`split_by_reference_gap` is the drop rule (``reference.drop_unsafe_pairs``, off by default).

Where the drop rule sits: the pipeline runs filter -> reference -> train, and RG^d only exists after the
reference stage, so the filter stage cannot apply it without running the model. The reference stage
must keep every pair (its artifact is the record of what the reference thinks of each pair, and the
report measures RG^d on all of them). The rule therefore runs at the start of the train stage, the only
consumer of the decision; the pairs it drops are written there as ``train/dropped_reference.parquet``
(DROPPED schema, reason ``reference_gap_not_positive``, detail the RG^d), and the guard then checks the
pairs actually trained on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa

from mpo_core.plumbing.errors import MPOError

DROP_REASON = "reference_gap_not_positive"


class UnsafeReferenceError(MPOError):
    """The reference is not safe in the dominant language on enough training pairs for MPO."""


@dataclass(frozen=True)
class GapStats:
    """RG^d over one group of pairs: count, mean, the share of pairs with RG^d > 0, min and max."""

    n: int
    mean: float
    safe_share: float
    min: float
    max: float

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "mean_reward_gap": self.mean, "safe_share": self.safe_share,
                "min_reward_gap": self.min, "max_reward_gap": self.max}


def _stats(gaps: list[float]) -> GapStats:
    if not gaps:
        nan = float("nan")
        return GapStats(0, nan, nan, nan, nan)
    return GapStats(len(gaps), sum(gaps) / len(gaps), sum(g > 0 for g in gaps) / len(gaps), min(gaps), max(gaps))


def reference_gaps(pairs: pa.Table, reference: pa.Table) -> list[float]:
    """RG^d of each row of ``pairs`` (joined on ``pair_id``); a pair without a reference row is an error."""
    by_id = dict(zip(reference.column("pair_id").to_pylist(), reference.column("reward_gap").to_pylist()))
    gaps = []
    for i, pair_id in enumerate(pairs.column("pair_id").to_pylist()):
        if pair_id not in by_id:
            raise MPOError(f"pairs: row {i}, column 'pair_id': {pair_id!r} has no reference row")
        gaps.append(float(by_id[pair_id]))
    return gaps


def reference_gap_stats(pairs: pa.Table, reference: pa.Table) -> dict[str, dict[str, float]]:
    """Per target language, and over all pairs as ``"all"``: ``n``, ``mean_reward_gap``, ``safe_share``,
    ``min_reward_gap``, ``max_reward_gap``. The one computation of these figures: the reference manifest, the
    guard, the report and the Prefect table all show what it returns."""
    gaps = reference_gaps(pairs, reference)
    by_lang: dict[str, list[float]] = defaultdict(list)
    for lang, gap in zip(pairs.column("target_lang").to_pylist(), gaps):
        by_lang[lang].append(gap)
    stats = {lang: _stats(values).as_dict() for lang, values in sorted(by_lang.items())}
    stats["all"] = _stats(gaps).as_dict()
    return stats


def check_premise(pairs: pa.Table, reference: pa.Table, min_safe_share: float) -> dict[str, dict[str, float]]:
    """The guard: the stats of :func:`reference_gap_stats`, or :class:`UnsafeReferenceError` when the share
    of ``pairs`` with RG^d > 0 is below ``min_safe_share``."""
    stats = reference_gap_stats(pairs, reference)
    overall = stats["all"]
    if overall["n"] == 0 or overall["safe_share"] < min_safe_share:
        per_lang = ", ".join(
            f"{lang} {s['safe_share']:.2f} (mean RG^d {s['mean_reward_gap']:+.2f}, n={s['n']})"
            for lang, s in stats.items() if lang != "all"
        )
        raise UnsafeReferenceError(
            f"MPO premise not met: the reference prefers the safe dominant-language answer (RG^d > 0) on "
            f"{overall['safe_share']:.2f} of {overall['n']} training pairs, below reference.min_safe_share="
            f"{min_safe_share} [{per_lang or 'no pairs'}]. Training would pull the target languages toward the "
            "unsafe answer. Align the dominant language first (align.enabled: true), choose a reference that is "
            "safe in the dominant language, drop those pairs (reference.drop_unsafe_pairs: true), or lower "
            "reference.min_safe_share on purpose."
        )
    return stats


def split_by_reference_gap(pairs: pa.Table, reference: pa.Table) -> tuple[pa.Table, list[dict]]:
    """The drop rule: (pairs with RG^d > 0, DROPPED rows of the others with reason and their RG^d)."""
    gaps = reference_gaps(pairs, reference)
    keep = pa.array([g > 0 for g in gaps])
    dropped = [
        dict(row, reason=DROP_REASON, detail=f"reference RG^d = {gap:+.4f}")
        for row, gap in zip(pairs.to_pylist(), gaps) if gap <= 0
    ]
    return pairs.filter(keep), dropped


def held_out_prompt_ids(prompts: pa.Table) -> set[str]:
    """The ``prompt_id`` of every held-out (``split == "eval"``) row of a PROMPTS table."""
    return {r["prompt_id"] for r in prompts.select(["prompt_id", "split"]).to_pylist() if r["split"] == "eval"}


def training_split(pairs: pa.Table, prompts: pa.Table | None) -> pa.Table:
    """The pairs of ``train``-split prompts: pairs of held-out (``eval``) prompts measure, never train."""
    if prompts is None:
        return pairs
    held_out = held_out_prompt_ids(prompts)
    if not held_out:
        return pairs
    keep = [pid not in held_out for pid in pairs.column("prompt_id").to_pylist()]
    return pairs.filter(pa.array(keep, type=pa.bool_()))

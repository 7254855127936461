"""Label noise on the target side of preference pairs: how a weak target-language judge fails.

:func:`flip_target_labels` swaps ``target_chosen`` and ``target_rejected`` on a fraction of the pairs; the
dominant side is never touched. In each target language exactly ``round(fraction * n)`` of its ``n`` pairs
are flipped: those with the smallest ``sha256(f"{seed}:{pair_id}")``. So the choice is deterministic by
seed, independent of row order, and nested (the pairs flipped at 20 % are among those flipped at 40 %).

The judge's scores and the fallback flags stay where they were: they are what the (wrong) judge reported
for each position, so a flipped pair looks as trustworthy to the filter as a clean one. The ``target_flipped``
column records the truth (``True`` flipped, ``False`` left as built). The pair stage applies it to built and
ready-made pairs alike (``pair.target_noise``, ``pair.noise_seed``); evaluation measures reward gaps against
the true labels. One filter rule can see a flip: ``length_ratio`` compares each target response with its
dominant counterpart, so on data with very unequal lengths a noisy run may keep a slightly different set of
pairs (1 in 600 of the official Llama data), and then its reference is computed again. The share is exact
over the pairs artifact, held-out pairs included (``generate.held_out_pairs``; training leaves them out), so
among the pairs a model trains on it is close to the setting, not exactly it.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

FLIPPED = "target_flipped"


@dataclass(frozen=True)
class NoiseSummary:
    """What :func:`flip_target_labels` did: the setting and the flips per target language."""

    fraction: float
    seed: int
    flipped: dict[str, int]
    pairs: dict[str, int]

    def as_dict(self) -> dict:
        return {"fraction": self.fraction, "seed": self.seed, "flipped": sum(self.flipped.values()),
                "pairs": sum(self.pairs.values()), "flipped_per_target_lang": self.flipped}


def _rank_key(seed: int, pair_id: str) -> str:
    return hashlib.sha256(f"{seed}:{pair_id}".encode()).hexdigest()


def flipped_rows(pair_ids: list[str], target_langs: list[str], fraction: float, seed: int) -> list[bool]:
    """Which rows to flip: per target language the ``round(fraction * n)`` rows of smallest seeded hash."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label noise fraction must lie in [0, 1], got {fraction}")
    by_lang: dict[str, list[int]] = defaultdict(list)
    for i, lang in enumerate(target_langs):
        by_lang[lang].append(i)
    flags = [False] * len(pair_ids)
    for rows in by_lang.values():
        ranked = sorted(rows, key=lambda i: (_rank_key(seed, pair_ids[i]), i))
        for i in ranked[: round(fraction * len(rows))]:
            flags[i] = True
    return flags


def flip_target_labels(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, NoiseSummary]:
    """``table`` (PAIRS) with ``target_chosen``/``target_rejected`` swapped on the flipped rows and the
    ``target_flipped`` column set on every row; and a summary of the flips."""
    pair_ids = table.column("pair_id").to_pylist()
    langs = table.column("target_lang").to_pylist()
    flags = flipped_rows(pair_ids, langs, fraction, seed)
    mask = pa.array(flags, type=pa.bool_())
    chosen = table.column("target_chosen").combine_chunks()
    rejected = table.column("target_rejected").combine_chunks()
    columns = {
        "target_chosen": pc.if_else(mask, rejected, chosen),
        "target_rejected": pc.if_else(mask, chosen, rejected),
        FLIPPED: mask,
    }
    for name, values in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, values)
        else:
            table = table.append_column(name, values)
    counts: dict[str, int] = defaultdict(int)
    flipped: dict[str, int] = defaultdict(int)
    for lang, flag in zip(langs, flags):
        counts[lang] += 1
        flipped[lang] += flag
    summary = NoiseSummary(fraction, seed, dict(sorted(flipped.items())), dict(sorted(counts.items())))
    return table, summary


def describe_noise(fraction: float, seed: int) -> str:
    """One line for reports: the label-noise setting of a run."""
    if fraction == 0:
        return "none (target labels as judged)"
    return f"{fraction:.0%} of target pairs per language have chosen and rejected swapped (seed {seed})"

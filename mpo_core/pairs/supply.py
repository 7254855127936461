"""How many pairs each target language has to train on and held out, and how many reject the raw model's
answer (marked in ``source`` by the pair stage when align left no unsafe dominant sample).
"""

from __future__ import annotations

from collections import Counter, defaultdict

RAW_REJECTED_MARK = "; dominant_rejected:"  # in ``source``: the dominant rejected answer is the raw model's


def rejects_raw_answer(pair: dict) -> bool:
    """Whether the pair's dominant rejected answer is the raw model's sample (marked in ``source``)."""
    return RAW_REJECTED_MARK in pair["source"]


def dominant_rejected_from_raw(pairs: list[dict]) -> dict[str, int]:
    """Per target language, the pairs whose dominant rejected answer is the raw model's sample."""
    return dict(sorted(Counter(p["target_lang"] for p in pairs if rejects_raw_answer(p)).items()))


def pair_supply(pairs: list[dict], held_out_ids: set[str]) -> dict[str, dict[str, int]]:
    """Per target language: ``train`` pairs (prompts outside ``held_out_ids``), ``held_out`` pairs, and
    ``raw_rejected``: training pairs whose dominant rejected answer is the raw model's."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"train": 0, "held_out": 0, "raw_rejected": 0})
    for p in pairs:
        counts = out[p["target_lang"]]
        held_out = p["prompt_id"] in held_out_ids
        counts["held_out" if held_out else "train"] += 1
        counts["raw_rejected"] += int(not held_out and rejects_raw_answer(p))
    return dict(sorted(out.items()))

"""Stable content ids and the pseudo-random train/eval split."""

from __future__ import annotations

import hashlib


def content_id(*parts: str, prefix: str = "", length: int = 16) -> str:
    """A stable id: ``prefix`` + the first ``length`` hex digits of sha256 over ``parts``."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return prefix + digest[:length]


def assign_split(prompt_id: str, eval_fraction: float, seed: int = 0) -> str:
    """``eval`` for a stable pseudo-random ``eval_fraction`` of prompt ids, else ``train``."""
    if eval_fraction <= 0.0:
        return "train"
    bucket = int(hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()[:8], 16) / 0x100000000
    return "eval" if bucket < eval_fraction else "train"

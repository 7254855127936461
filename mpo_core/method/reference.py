"""The reference computation of MPO: what the frozen starting model contributes to the objective.

For each pair, on the dominant side only: ``s_ref(y_w^d|x^d)``, ``s_ref(y_l^d|x^d)``, their difference RG^d
(the target of L1) and the final hidden states mean-pooled over real tokens (the target of L2). Training
refuses a reference scored on other token sequences than it trains on (:func:`check_reference_encoding`).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from mpo_core.method.encoding import encode_prompt_responses
from mpo_core.method.logps import sequence_outputs
from mpo_core.method.losses import reward_gap
from mpo_core.plumbing.artifacts import read_manifest
from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.errors import ConfigError


def dominant_sequences(
    tokenizer, pairs: pa.Table, max_length: int, truncation: str = "prompt_left"
) -> list[tuple]:
    """Encoded ``(chosen, rejected)`` dominant-language sequences of every pair, in table order."""
    return [
        tuple(encode_prompt_responses(tokenizer, p, [c, r], max_length, truncation=truncation))
        for p, c, r in zip(
            pairs.column("dominant_prompt").to_pylist(),
            pairs.column("dominant_chosen").to_pylist(),
            pairs.column("dominant_rejected").to_pylist(),
        )
    ]


def encoding_settings(config: PipelineConfig, max_length: int) -> dict:
    """What decides the token sequences of a pair: stored in the reference manifest, compared by training."""
    return {
        "max_length": max_length,
        "truncation": config.model.truncation,
        "chat_template": config.model.chat_template,
    }


def check_reference_encoding(reference_path: Path, config: PipelineConfig) -> None:
    """Refuse a reference built from other token sequences than training would use (another max length,
    truncation or chat template): its RG^d and pooled states would not be those of the trained sequences,
    and L2 would not start at 0. Raises :class:`ConfigError` naming the settings."""
    stored = read_manifest(reference_path).extra
    defaults = {"truncation": "prompt_left", "chat_template": None}  # references written before these keys
    wanted = encoding_settings(config, config.train.max_length)
    for key, value in wanted.items():
        built = stored.get(key, defaults.get(key))
        if built != value:
            names = {"max_length": ("reference.max_length", "train.max_length")}.get(key, (f"model.{key}",) * 2)
            raise ConfigError(
                f"{reference_path}: the reference was built with {names[0]}={built!r} but training would use "
                f"{names[1]}={value!r}; the reference must score exactly the sequences training uses: set "
                f"them equal and rerun the reference stage"
            )


def reference_outputs(model, dominant_batch: dict) -> dict:
    """What the reference stage stores for a collated dominant-side pair batch (chosen rows, then rejected
    rows): ``chosen_avg_logp`` and ``rejected_avg_logp`` ``[n]``, ``reward_gap = chosen - rejected`` ``[n]``
    and ``pooled`` ``[2n, H]`` (chosen rows first). Gradients follow the caller's grad mode."""
    out = sequence_outputs(model, dominant_batch, paired=True)
    n = out["avg_logps"].shape[0] // 2
    chosen, rejected = out["avg_logps"][:n], out["avg_logps"][n:]
    return {
        "chosen_avg_logp": chosen,
        "rejected_avg_logp": rejected,
        "reward_gap": reward_gap(chosen, rejected),
        "pooled": out["pooled"],
    }

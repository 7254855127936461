"""The reference stage: the frozen starting model, once, over the dominant-language side of every pair.

For each pair it stores ``s_ref(y_w^d|x^d)``, ``s_ref(y_l^d|x^d)``, ``RG^d`` = their difference, and the
reference's final hidden states of the dominant chosen and rejected sequences mean-pooled over real tokens.
MPO's L1 and L2 need nothing else from the reference, so training keeps no reference model in memory.
The manifest records MPO's premise per target language (``premise``: mean RG^d and share of pairs with
RG^d > 0, :func:`mpo_core.method.premise.reference_gap_stats`).

Resumable: pairs are processed in a fixed, length-sorted plan of batches; each finished batch is written as
an atomic shard in ``out_dir/shards-<identity>/`` and skipped on restart. ``reference.parquet`` is written
atomically from the shards at the end, in the order of the input pairs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pyarrow as pa

from mpo_core.plumbing.artifacts import artifact_is_complete, read_artifact, read_manifest, write_artifact
from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.errors import ConfigError
from mpo_core.method.premise import reference_gap_stats
from mpo_core.plumbing.progress import Tracker
from mpo_core.plumbing.stage_table import stage_call, starting_model

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference.parquet"


def dominant_sequences(
    tokenizer, pairs: pa.Table, max_length: int, truncation: str = "prompt_left"
) -> list[tuple]:
    """Encoded ``(chosen, rejected)`` dominant-language sequences of every pair, in table order."""
    from mpo_core.method.logps import encode_prompt_responses

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
    from mpo_core.method.logps import sequence_outputs
    from mpo_core.method.losses import reward_gap

    out = sequence_outputs(model, dominant_batch, paired=True)
    n = out["avg_logps"].shape[0] // 2
    chosen, rejected = out["avg_logps"][:n], out["avg_logps"][n:]
    return {
        "chosen_avg_logp": chosen,
        "rejected_avg_logp": rejected,
        "reward_gap": reward_gap(chosen, rejected),
        "pooled": out["pooled"],
    }


def run_reference(config: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> dict[str, Path]:
    """Stage entry: write ``reference.parquet`` (REFERENCE schema) for the pairs in ``inputs["filtered"]``."""
    import torch

    from mpo_core.method.logps import collate_pairs, length_sorted_batches
    from mpo_core.common.models import load_model, load_tokenizer, model_fingerprint

    out_dir = Path(out_dir)
    out_path = out_dir / REFERENCE_FILE
    call = stage_call("reference", config, inputs)
    identity = call.identity
    if artifact_is_complete(out_path) and read_manifest(out_path).config_hash == identity:
        return {"reference": out_path}

    pairs = read_artifact(inputs["filtered"], "pairs")
    model_cfg = starting_model(config, inputs)
    tokenizer = load_tokenizer(model_cfg, padding_side="right")
    encoded = dominant_sequences(tokenizer, pairs, config.reference.max_length, config.model.truncation)
    pair_ids = pairs.column("pair_id").to_pylist()
    plan = length_sorted_batches(
        [max(len(c.input_ids), len(r.input_ids)) for c, r in encoded], config.reference.batch_size
    )
    shard_dir = out_dir / f"shards-{identity[:16]}"
    shard_paths = [shard_dir / f"batch-{k:05d}.parquet" for k in range(len(plan))]
    todo = [k for k, path in enumerate(shard_paths) if not artifact_is_complete(path)]

    fingerprint = model_fingerprint(model_cfg)
    if todo:
        model = load_model(model_cfg).eval()
        device = next(model.parameters()).device
        with Tracker(len(plan), "reference") as tracker, torch.inference_mode():
            tracker.update(len(plan) - len(todo))
            for k in todo:
                idx = plan[k]
                batch = collate_pairs([encoded[i] for i in idx], tokenizer.pad_token_id)
                outputs = reference_outputs(model, {key: t.to(device) for key, t in batch.items()})
                out = {key: t.float().cpu() for key, t in outputs.items()}
                n = len(idx)
                write_artifact(
                    {
                        "pair_id": [pair_ids[i] for i in idx],
                        "dominant_chosen_avg_logp": out["chosen_avg_logp"].tolist(),
                        "dominant_rejected_avg_logp": out["rejected_avg_logp"].tolist(),
                        "reward_gap": out["reward_gap"].tolist(),
                        "chosen_pooled": out["pooled"][:n].tolist(),
                        "rejected_pooled": out["pooled"][n:].tolist(),
                        "model_fingerprint": [fingerprint] * n,
                    },
                    shard_paths[k],
                    "reference",
                    config_hash=identity,
                )
                tracker.update(1)
        del model

    shards = pa.concat_tables([read_artifact(path, "reference") for path in shard_paths]) if plan else None
    if shards is None:
        from mpo_core.plumbing.schemas import REFERENCE

        table = REFERENCE.empty_table()
    else:
        position = {pid: i for i, pid in enumerate(shards.column("pair_id").to_pylist())}
        table = shards.take([position[pid] for pid in pair_ids])
    premise = reference_gap_stats(pairs, table)
    write_artifact(
        table,
        out_path,
        "reference",
        **call.provenance,
        extra={
            "model_fingerprint": fingerprint,
            **encoding_settings(config, config.reference.max_length),
            "premise": premise,
        },
    )
    shutil.rmtree(shard_dir, ignore_errors=True)
    overall = premise["all"]
    if overall["n"]:
        logger.info("reference: RG^d mean %+.4f on %d pairs; %.0f %% are safe dominant pairs (RG^d > 0)",
                    overall["mean_reward_gap"], overall["n"], 100.0 * overall["safe_share"])
    return {"reference": out_path}

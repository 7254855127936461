"""The reference stage: the frozen starting model, once, over the dominant-language side of every pair.

For each pair it stores ``s_ref(y_w^d|x^d)``, ``s_ref(y_l^d|x^d)``, ``RG^d`` = their difference, and the
reference's final hidden states of the dominant chosen and rejected sequences mean-pooled over real tokens.
MPO's L1 and L2 need nothing else from the reference, so training keeps no reference model in memory.
The manifest records MPO's premise per target language (``premise``: mean RG^d and share of pairs with
RG^d > 0, :func:`mpo_core.method.premise.reference_gap_stats`).

The computation itself is :mod:`mpo_core.method.reference`; this module runs it over the pairs.

Resumable: pairs are processed in a fixed, length-sorted plan of batches; each finished batch is written as
an atomic shard in ``out_dir/shards/`` and skipped when an interrupted stage resumes. The stage's output is
assembled from the shards at the end, in the order of the input pairs.
"""

from __future__ import annotations

import logging
import shutil

import pyarrow as pa

from mpo_core.method.premise import reference_gap_stats
from mpo_core.method.reference import dominant_sequences, encoding_settings, reference_outputs
from mpo_core.plumbing.artifacts import artifact_is_complete, read_artifact
from mpo_core.plumbing.progress import Tracker
from mpo_core.plumbing.schemas import REFERENCE
from mpo_core.plumbing.stage_run import Artifact, StageRun

logger = logging.getLogger(__name__)

SHARD_DIR = "shards"


def run_reference(stage: StageRun) -> dict[str, Artifact]:
    """Stage entry: the ``reference`` artifact (REFERENCE schema) for the pairs of ``filtered``."""
    import torch

    from mpo_core.common.models import load_model, load_tokenizer, model_fingerprint
    from mpo_core.method.encoding import collate_pairs
    from mpo_core.method.logps import length_sorted_batches

    config = stage.config
    pairs = stage.inputs.table("filtered")
    model_cfg = stage.model
    tokenizer = load_tokenizer(model_cfg, padding_side="right")
    encoded = dominant_sequences(tokenizer, pairs, config.reference.max_length, config.model.truncation)
    pair_ids = pairs.column("pair_id").to_pylist()
    plan = length_sorted_batches(
        [max(len(c.input_ids), len(r.input_ids)) for c, r in encoded], config.reference.batch_size
    )
    shard_files = [f"{SHARD_DIR}/batch-{k:05d}.parquet" for k in range(len(plan))]
    todo = [k for k, file in enumerate(shard_files) if not artifact_is_complete(stage.out_dir / file)]

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
                stage.write(shard_files[k], {
                    "pair_id": [pair_ids[i] for i in idx],
                    "dominant_chosen_avg_logp": out["chosen_avg_logp"].tolist(),
                    "dominant_rejected_avg_logp": out["rejected_avg_logp"].tolist(),
                    "reward_gap": out["reward_gap"].tolist(),
                    "chosen_pooled": out["pooled"][:n].tolist(),
                    "rejected_pooled": out["pooled"][n:].tolist(),
                    "model_fingerprint": [fingerprint] * n,
                }, "reference")
                tracker.update(1)
        del model

    if plan:
        shards = pa.concat_tables([read_artifact(stage.out_dir / file, "reference") for file in shard_files])
        position = {pid: i for i, pid in enumerate(shards.column("pair_id").to_pylist())}
        table = shards.take([position[pid] for pid in pair_ids])
    else:
        table = REFERENCE.empty_table()
    premise = reference_gap_stats(pairs, table)
    overall = premise["all"]
    if overall["n"]:
        logger.info("reference: RG^d mean %+.4f on %d pairs; %.0f %% are safe dominant pairs (RG^d > 0)",
                    overall["mean_reward_gap"], overall["n"], 100.0 * overall["safe_share"])
    extra = {"model_fingerprint": fingerprint, **encoding_settings(config, config.reference.max_length),
             "premise": premise}
    with stage.writer("reference", extra) as out:
        out.write(table)
    shutil.rmtree(stage.out_dir / SHARD_DIR, ignore_errors=True)
    return {}

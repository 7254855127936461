"""Stage ``train``: MPO (or a baseline) on the filtered pairs of train-split prompts, with the precomputed
reference (:mod:`mpo_core.training`); the premise guard and drop rule of :mod:`mpo_core.method.premise` first."""

from __future__ import annotations

from typing import Any

from mpo_core.method.premise import check_premise, split_by_reference_gap, training_split
from mpo_core.method.reference import check_reference_encoding
from mpo_core.plumbing.errors import InputDataError
from mpo_core.plumbing.stage_run import Artifact, StageRun
from mpo_core.training.fit import fit

DROPPED_REFERENCE_FILE = "dropped_reference.parquet"


def run_train(stage: StageRun) -> dict[str, Artifact]:
    """Stage entry: train on ``filtered`` (+ ``reference`` for MPO) into ``checkpoint`` (``model/``), resuming
    from the latest checkpoint in ``checkpoints/`` when the runner resumes an interrupted run.

    Pairs of held-out prompts (``eval`` split of ``translated``) are left out. For MPO, the drop rule
    (``reference.drop_unsafe_pairs``) and then the premise guard (``reference.min_safe_share``) of
    :mod:`mpo_core.method.premise` run first. The model trained is the ``aligned`` checkpoint when align ran."""
    config, inputs = stage.config, stage.inputs
    pairs = training_split(inputs.table("filtered"), inputs.table_or_none("translated"))
    if pairs.num_rows == 0:
        raise InputDataError(f"{inputs.path('filtered')}: no pairs of train-split prompts to train on")
    reference = None
    info: dict[str, Any] = {"inputs": stage.input_hashes, "pairs": pairs.num_rows}
    if config.train.loss == "mpo":
        if "reference" not in inputs:
            raise InputDataError("train.loss=mpo needs the 'reference' artifact")
        check_reference_encoding(inputs.path("reference"), config)
        reference = inputs.table("reference")
        if config.reference.drop_unsafe_pairs:
            pairs, dropped = split_by_reference_gap(pairs, reference)
            stage.write(DROPPED_REFERENCE_FILE, dropped, "dropped")
            info["dropped_reference_gap_not_positive"] = len(dropped)
        info["premise"] = check_premise(pairs, reference, config.reference.min_safe_share)
    fit(config, stage.model, pairs, reference, stage.out_dir, info)
    return {}

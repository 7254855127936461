"""Stage ``filter``: ``pairs`` -> ``filtered`` + ``dropped`` (every dropped row with its reason) + the filter
report, streamed in record batches through :class:`mpo_core.pairs.filtering.PairFilter`."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from mpo_core.generation.vllm_backend import vllm_engine_scope
from mpo_core.pairs.filter_report import reason_rows, report_markdown
from mpo_core.pairs.filtering import SCORE_FIELDS, PairFilter
from mpo_core.plumbing.artifacts import write_text_atomically
from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.errors import ModelLoadError
from mpo_core.plumbing.progress import Tracker
from mpo_core.plumbing.stage_run import Artifact, StageRun

logger = logging.getLogger(__name__)


def _load_tokenizer(config: PipelineConfig) -> tuple[Any, str]:
    from mpo_core.common.models import load_tokenizer

    try:
        return load_tokenizer(config.model), "tokenizer"
    except (ModelLoadError, OSError, ValueError, ImportError) as err:
        return None, f"text only (tokenizer of {config.model.name_or_path} not loadable: {err})"


def _judge_for_unscored(config: PipelineConfig, source: Path) -> Any:
    """The configured judge (``label`` section) when some pair of ``source`` has none of its four scores
    (a generated pair with a fallback chosen lacks only that one), else None: no judge model is loaded."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    scores = pq.read_table(source, columns=list(SCORE_FIELDS))
    unscored = functools.reduce(pc.and_, (pc.is_null(scores.column(name)) for name in SCORE_FIELDS))
    if not pc.any(unscored).as_py():
        return None
    from mpo_core.judges.select import get_judge

    return get_judge(config.label, config.model, config.generate.vllm)


def _log_decisions(rows: list[dict[str, Any]], token_check: str) -> None:
    totals = {row["outcome"]: row["total"] for row in rows}
    logger.info("filter: kept %d of %d pairs, dropped %d (%s)", totals.get("kept", 0), totals.get("input", 0),
                totals.get("dropped: any", 0), token_check)
    for outcome, total in totals.items():
        if outcome.startswith(("dropped: ", "repaired: ")) and outcome != "dropped: any":
            logger.info("filter: %s: %d", outcome, total)


def run_filter(stage: StageRun) -> dict[str, Artifact]:
    """Stage ``filter`` (:func:`filter_pairs`), an LLM judge's vLLM engine shut down when it ends."""
    with vllm_engine_scope():
        return filter_pairs(stage)


def filter_pairs(stage: StageRun) -> dict[str, Artifact]:
    """Stage ``filter``: ``pairs`` -> ``filtered`` (PAIRS), ``dropped`` (DROPPED), ``filter_report``.

    Pairs without judge scores (``pair.source``) are first scored by the configured judge (``label``).

    Streams the input in record batches; the report is written as Parquet (``filter_report.parquet``, an
    artifact) and Markdown beside it (``filter_report.md``, the stage's output).
    """
    config = stage.config
    source = stage.inputs.path("pairs")
    tokenizer, token_check = _load_tokenizer(config)
    pair_filter = PairFilter(config.filter, max_length=config.reference.max_length, tokenizer=tokenizer,
                             processes=config.filter.langid_processes, judge=_judge_for_unscored(config, source))
    extra = {"token_check": token_check}
    with stage.writer("filtered", extra) as kept_out, stage.writer("dropped") as dropped_out, \
            Tracker(stage.inputs.rows("pairs"), "filter", unit="pairs") as tracker:
        for batch in stage.inputs.batches("pairs", batch_size=config.filter.batch_size):
            kept, dropped = pair_filter.filter_batch(batch)
            kept_out.write(kept)
            dropped_out.write(dropped)
            tracker.update(batch.num_rows)
    report = pair_filter.report_table()
    _log_decisions(reason_rows(report), token_check)
    stage.write("filter_report.parquet", report, "filter_report", extra)
    markdown = report_markdown(report, f"Filter report: {source.name}")
    write_text_atomically(stage.path("filter_report"), markdown + f"\nEmpty-after-truncation check: {token_check}.\n")
    return {}

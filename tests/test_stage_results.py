"""What each stage shows a person: metrics per language, the headline, the training curve and its log
lines, RG^d per language, the filter's reasons, phases in the progress, report plots carried inline."""

from __future__ import annotations

import base64
import json
import logging

import pyarrow as pa
import pytest

from mpo_core.pairs.filter_report import reason_rows, report_markdown
from mpo_core.plumbing.progress import Tracker, phase, progress_listener, round_seconds
from mpo_core.plumbing.schemas import FILTER_REPORT
from mpo_core.results.report import PLOT_FILES, markdown_with_inline_plots, write_report
from mpo_core.results.stage_results import (
    headline,
    metrics_table,
    plot_training_curve,
    read_log_history,
    reference_gaps,
    training_curve,
    training_log_line,
    training_summary,
)
from tests.test_report import PNG_MAGIC, _rows


def test_metrics_table_has_both_models_delta_and_reference_per_language():
    rows = metrics_table(_rows())
    zh_asr = next(r for r in rows if r["lang"] == "zh" and r["metric"] == "asr")
    assert zh_asr["base"] == pytest.approx(0.65) and zh_asr["trained"] == pytest.approx(0.45)
    assert (zh_asr["base_ci_low"], zh_asr["base_ci_high"]) == (pytest.approx(0.55), pytest.approx(0.75))
    assert zh_asr["delta"] == pytest.approx(-0.2) and zh_asr["delta_ci_low"] == pytest.approx(-0.35)
    assert zh_asr["n"] == 20 and zh_asr["reference"] is None
    gap = next(r for r in rows if r["lang"] == "bn" and r["metric"] == "reward_gap")
    assert gap["reference"] == pytest.approx(0.4) and gap["trained"] == pytest.approx(-0.2 + 0.3 - 0.1)
    assert not any(r["metric"].startswith("reward_gap_") for r in rows)  # spread statistics stay in the report
    assert {r["lang"] for r in rows} == {"en", "zh", "bn"}


def test_headline_is_three_lines_averaged_over_target_languages():
    lines = headline(_rows(), dominant_lang="en")
    assert len(lines) == 3
    asr_base, asr_trained = (0.6 + 0.05 + 0.6 + 0.1) / 2, (0.4 + 0.05 + 0.4 + 0.1) / 2
    assert lines[0] == (f"Attack success rate (mean over bn, zh): {asr_base:.3f} -> {asr_trained:.3f} "
                        f"({asr_trained - asr_base:+.3f})")
    assert lines[1].startswith("Reward gap RG^t (mean over bn, zh): ") and "reference RG^d (en) +0.400" in lines[1]
    assert lines[2].startswith("Over-refusal") and "0.100 -> 0.100" in lines[2]
    base_only = headline(_rows(roles=("base",)), dominant_lang="en")
    assert base_only[0] == f"Attack success rate (mean over bn, zh): {asr_base:.3f}"
    assert headline([], "en")[0].endswith("not measured")


def test_training_curve_summary_and_log_line(tmp_path):
    log = tmp_path / "log_history.json"
    lines = [
        {"step": 1, "epoch": 0.5, "loss": 0.9, "l1": 0.8, "l2": 0.1, "target_gap": -0.5, "learning_rate": 1e-5,
         "target_gap/zh": -0.4, "target_gap/ja": -0.6, "target_gap_accuracy/zh": 0.0},
        {"step": 2, "epoch": 1.0, "loss": 0.5, "l1": 0.45, "l2": 0.05, "target_gap": 0.25,
         "target_gap/zh": 0.5, "target_gap/ja": 0.0},
        {"step": 2, "train_runtime": 12.0, "train_loss": 0.7},  # the trainer's closing summary: not a step
    ]
    log.write_text(json.dumps(lines), encoding="utf-8")
    curve = training_curve(read_log_history(log))
    assert [row["step"] for row in curve] == [1, 2]
    assert curve[0] == {"step": 1, "epoch": 0.5, "loss": 0.9, "l1": 0.8, "l2": 0.1, "target_gap": -0.5,
                        "learning_rate": 1e-5, "target_gap/ja": -0.6, "target_gap/zh": -0.4}
    assert training_summary(curve) == {"step": 2, "loss": 0.5, "l1": 0.45, "l2": 0.05, "target_gap": 0.25,
                                       "target_gap/ja": 0.0, "target_gap/zh": 0.5}
    assert training_summary([]) == {} and read_log_history(tmp_path / "absent.json") == []
    text = training_log_line(lines[0], 1, 12)
    assert text == ("step 1/12 | loss 0.9000 | L1 0.8000 | L2 0.1000 | RG^t -0.5000 | lr 1e-05 | "
                    "RG^t by language ja -0.600, zh -0.400")
    assert plot_training_curve(curve).startswith(PNG_MAGIC) and plot_training_curve([]) is None


def test_reference_gaps_table_is_the_premise_the_reference_records():
    from mpo_core.method.premise import reference_gap_stats

    reference = pa.table({"pair_id": ["a", "b", "c", "d"], "reward_gap": [0.5, -0.25, 1.0, -1.0]})
    pairs = pa.table({"pair_id": ["a", "b", "c"], "target_lang": ["zh", "zh", "ja"]})
    rows = reference_gaps(reference_gap_stats(pairs, reference))
    assert rows == [
        {"target_lang": "ja", "pairs": 1, "mean_rg_d": 1.0, "min_rg_d": 1.0, "max_rg_d": 1.0, "safe_share": 1.0},
        {"target_lang": "zh", "pairs": 2, "mean_rg_d": 0.125, "min_rg_d": -0.25, "max_rg_d": 0.5,
         "safe_share": 0.5},
        {"target_lang": "all", "pairs": 3, "mean_rg_d": 0.41667, "min_rg_d": -0.25, "max_rg_d": 1.0,
         "safe_share": 0.66667},
    ]
    assert reference_gaps({"all": {"n": 0, "mean_reward_gap": float("nan"), "safe_share": float("nan")}}) == []


def test_filter_reason_rows_are_the_report_markdown_rows():
    counts = [("zh", "input", None, 5), ("zh", "kept", None, 3), ("zh", "dropped", "any", 2),
              ("zh", "dropped", "duplicate", 2), ("ja", "input", None, 4), ("ja", "kept", None, 3),
              ("ja", "dropped", "any", 1), ("ja", "dropped", "markup", 1), ("ja", "repaired", "html_entities:x", 2)]
    report = pa.Table.from_pylist([{"lang": a, "outcome": b, "reason": c, "pairs": d} for a, b, c, d in counts],
                                  schema=FILTER_REPORT)
    rows = reason_rows(report)
    assert [r["outcome"] for r in rows] == ["input", "kept", "dropped: any", "dropped: markup",
                                           "dropped: duplicate", "repaired: html_entities:x"]
    assert rows[4] == {"outcome": "dropped: duplicate", "ja": 0, "zh": 2, "total": 2}
    markdown = report_markdown(report)
    assert "| dropped: duplicate | 0 | 2 | 2 |" in markdown and "| input | 4 | 5 | 9 |" in markdown


def test_phases_name_what_runs_in_progress_and_logs(caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger="mpo_core"), progress_listener(lambda *a: seen.append(a)):
        with phase("trained model"):
            with phase("loading model"):
                pass
            with Tracker(2, "generate") as tracker:
                tracker.update(2)
        with Tracker(0, "empty"):
            pass
    assert seen == [("trained model", 0, 0), ("trained model: loading model", 0, 0),
                    ("trained model: generate", 0, 2), ("trained model: generate", 2, 2)]
    messages = [r.getMessage() for r in caplog.records]
    assert "trained model: loading model ..." in messages
    assert any(m.startswith("trained model: generate: 2/2 it in ") for m in messages)
    assert any(m.startswith("trained model done in ") for m in messages)
    assert round_seconds(12.345) == 12.3


def test_report_markdown_carries_its_plots_inline(tmp_path):
    paths = write_report(_rows(), tmp_path / "report")
    inline = markdown_with_inline_plots(paths["markdown"])
    uris = [part.split(")")[0] for part in inline.split("](data:image/png;base64,")[1:]]
    assert len(uris) == len([name for name in PLOT_FILES.values() if (tmp_path / "report" / name).exists()]) >= 2
    assert all(base64.b64decode(uri).startswith(PNG_MAGIC) for uri in uris)
    assert not any(name in inline for name in PLOT_FILES.values())

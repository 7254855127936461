"""The report's pair-supply and transfer diagnostics: pairs per language, target means, the training curve."""

from __future__ import annotations

import json

from mpo_core.plumbing.artifacts import write_artifact
from mpo_core.plumbing.config import config_from_dict
from mpo_core.plumbing.seed import load_seed_prompts
from mpo_core.results.sentences import (
    pair_supply_line,
    pipeline_meta,
    target_means_line,
    training_curve_line,
)


def _pair(prompt_id, lang, source="generated:m"):
    return {
        "pair_id": f"{prompt_id}:en-{lang}", "prompt_id": prompt_id, "dominant_lang": "en", "target_lang": lang,
        "dominant_prompt": "p", "dominant_chosen": "no", "dominant_rejected": "yes", "target_prompt": "p",
        "target_chosen": "no", "target_rejected": "yes", "source": source, "judge": "j",
        "dominant_chosen_score": 1.0, "dominant_rejected_score": 0.0, "target_chosen_score": 1.0,
        "target_rejected_score": 0.0, "dominant_chosen_fallback": False, "target_chosen_fallback": False,
        "target_flipped": False,
    }


def test_pair_supply_line_counts_train_held_out_and_raw_rejected(tmp_path):
    translated, filtered = tmp_path / "translated.parquet", tmp_path / "filtered.parquet"
    write_artifact(load_seed_prompts(), translated, "prompts")
    raw = "generated:aligned; dominant_rejected:raw"
    write_artifact([_pair("h001", "zh", raw), _pair("h002", "zh"), _pair("h003", "zh", raw), _pair("h001", "sw")],
                   filtered, "pairs")
    assert pair_supply_line(filtered, translated) == "sw 1 / 0 (0 raw); zh 2 / 1 (1 raw)"  # h003: eval split


def test_target_means_line_goes_raw_aligned_trained_over_target_languages():
    config = config_from_dict({"run": {"target_langs": ["zh", "ko"]}})

    def row(model, lang, metric, value, dataset="seed"):
        return {"model": model, "lang": lang, "metric": metric, "value": value, "dataset": dataset}

    rows = [row(m, lang, "asr", v) for m, v in (("raw", 1.0), ("base", 0.8), ("trained", 0.4))
            for lang in ("en", "zh", "ko")]
    rows += [row("trained", "zh", "reward_gap", 0.5, "pairs:held-out"), row("trained", "ko", "reward_gap", 0.1,
                                                                             "pairs:held-out")]
    text = target_means_line(rows, config)
    assert text.startswith("raw -> base -> trained: asr 1.000 -> 0.800 -> 0.400;")
    assert "reward_gap – -> – -> 0.300" in text
    assert target_means_line([r for r in rows if r["model"] != "trained"], config) is None


def test_training_curve_line_reads_first_and_last_step(tmp_path):
    log = tmp_path / "log_history.json"
    lines = [{"step": 1, "loss": 2.0, "l1": 1.5, "l2": 0.5, "target_gap": -0.2},
             {"step": 2, "learning_rate": 1e-5},
             {"step": 4, "loss": 0.5, "l1": 0.4, "l2": 0.1, "target_gap": 0.3}]
    log.write_text(json.dumps(lines), encoding="utf-8")
    assert training_curve_line(log) == ("steps 1 -> 4: loss +2.000 -> +0.500, l1 +1.500 -> +0.400, "
                                        "l2 +0.500 -> +0.100, target_gap -0.200 -> +0.300")
    assert training_curve_line(tmp_path / "missing.json") is None


def test_report_reads_the_log_history_saved_beside_the_trained_model(tmp_path):
    from mpo_core.training.checkpoints import LOG_HISTORY, TRAIN_INFO

    model = tmp_path / "train" / "model"
    model.mkdir(parents=True)
    (model / TRAIN_INFO).write_text(json.dumps({"global_step": 2}), encoding="utf-8")
    history = [{"step": 1, "loss": 2.0, "l1": 1.5}, {"step": 2, "loss": 1.0, "l1": 0.5},
               {"step": 2, "train_runtime": 3.0, "train_loss": 1.5}]
    (model / LOG_HISTORY).write_text(json.dumps(history), encoding="utf-8")
    curve = pipeline_meta({"checkpoint": model})["training curve (first -> last logged step)"]
    assert curve == "steps 1 -> 2: loss +2.000 -> +1.000, l1 +1.500 -> +0.500"


def test_report_says_what_align_trained_on_extra_pairs_included(tmp_path):
    from mpo_core.training.checkpoints import TRAIN_INFO

    aligned = tmp_path / "align" / "model"
    aligned.mkdir(parents=True)
    record = {"method": "dpo", "rows": {"harmful": 38, "benign": 20, "benign_answer_refused": 0},
              "extra_pairs": {"file": "llama_mpo_data.json", "file_prompts": 100, "evaluation_overlap_dropped": 1,
                              "rejected_refused": 3, "extra": 96}}
    (aligned / TRAIN_INFO).write_text(json.dumps({"global_step": 18, "align": record}), encoding="utf-8")
    line = pipeline_meta({"aligned": aligned})["align (raw -> base)"]
    assert line == ("method=dpo, global_step=18; trained on 38 harmful prompts -> refusals, 20 benign prompts -> "
                    "own answers (0 benign answers that refused left out), 96 harmful prompts of llama_mpo_data.json "
                    "-> their safe answer over their unsafe one (1 equal to an evaluation prompt and 3 whose unsafe "
                    "answer refuses left out)")
    del record["extra_pairs"]
    (aligned / TRAIN_INFO).write_text(json.dumps({"global_step": 18, "align": record}), encoding="utf-8")
    assert pipeline_meta({"aligned": aligned})["align (raw -> base)"].endswith("(0 benign answers that refused left out)")

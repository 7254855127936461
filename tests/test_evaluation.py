"""The evaluate stage's data loaders, summaries and paired deltas; the real default model end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from mpo_core.evaluation.measure import Observations
from mpo_core.evaluation.sets import PairSet, load_pair_set, seed_holdout
from mpo_core.evaluation.summaries import paired_delta_rows, reference_rows, summary_rows
from mpo_core.plumbing.config import PipelineConfig, config_from_dict
from mpo_core.plumbing.errors import InputDataError
from mpo_core.plumbing.stage_run import run_stage_function
from mpo_core.readers.utility import load_mgsm, load_multiple_choice


def _config(**evaluate) -> PipelineConfig:
    return config_from_dict({"evaluate": evaluate, "run": {"target_langs": ["zh", "bn"]}})


def test_seed_holdout_is_the_eval_split():
    rows = seed_holdout(None)
    assert rows and all(r["split"] == "eval" for r in rows)
    langs = {r["lang"] for r in rows}
    assert langs == {"en", "zh", "ja", "ko", "ar", "bn", "sw"}
    assert {r["harmful"] for r in rows} == {True, False}  # benign prompts measure over-refusal


def test_load_mgsm_from_folder_and_file(shared_data):
    items = load_mgsm(str(shared_data / "mgsm"), ["en", "bn", "ko"], limit=5)
    assert [i["lang"] for i in items] == ["en"] * 5 + ["bn"] * 5  # no Korean MGSM
    assert items[0]["gold"] == 18 and items[5]["gold"] == 18
    one = load_mgsm(str(shared_data / "mgsm" / "mgsm_th.tsv"), ["th"], limit=None)
    assert len(one) == 250


def test_load_mgsm_bad_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "mgsm_en.tsv"
    bad.write_text("What is 1+1?\t2\nno answer column here\n", encoding="utf-8")
    with pytest.raises(InputDataError, match=r"mgsm_en.tsv: line 2"):
        load_mgsm(str(bad), ["en"], None)
    bad.write_text("What is 1+1?\ttwo\n", encoding="utf-8")
    with pytest.raises(InputDataError, match=r"line 1, column 'answer'"):
        load_mgsm(str(bad), ["en"], None)


def test_load_multiple_choice_mmmlu_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "mmlu_ZH_CN.csv"
    csv_path.write_text("\ufeffQuestion,A,B,C,D,Answer,Subject\n1+1=?,1,2,3,4,B,math\n", encoding="utf-8")
    items = load_multiple_choice(str(csv_path))
    assert items == [{"lang": "zh", "question": "1+1=?", "options": ["1", "2", "3", "4"], "answer": 1}]
    jsonl = tmp_path / "mc.jsonl"
    jsonl.write_text(json.dumps({"lang": "sw", "question": "q", "options": ["a", "b"], "answer": 0}) + "\n")
    assert load_multiple_choice(str(jsonl))[0]["answer"] == 0
    jsonl.write_text(json.dumps({"lang": "sw", "question": "q", "options": ["a", "b"], "answer": "C"}) + "\n")
    with pytest.raises(InputDataError, match=r"row 1, column 'answer'"):
        load_multiple_choice(str(jsonl))


def _pairs_table() -> pa.Table:
    rows = []
    for i, (pid, lang) in enumerate([("p1", "zh"), ("p2", "zh"), ("p1", "bn"), ("p3", "bn")]):
        rows.append({
            "pair_id": f"{pid}-{lang}", "prompt_id": pid, "dominant_lang": "en", "target_lang": lang,
            "dominant_prompt": f"x {pid}", "dominant_chosen": "no", "dominant_rejected": "yes",
            "target_prompt": f"x {pid} {lang}", "target_chosen": "no", "target_rejected": f"yes {i}",
        })
    return pa.Table.from_pylist(rows)


def test_load_pair_set_prefers_held_out_prompts_and_attaches_reference():
    config = _config()
    translated = pa.Table.from_pylist([{"prompt_id": "p1", "split": "train"}, {"prompt_id": "p3", "split": "eval"}])
    reference = pa.Table.from_pylist([{"pair_id": "p3-bn", "reward_gap": 0.5}, {"pair_id": "p1-zh", "reward_gap": 0.1}])
    held_out = load_pair_set(config, _pairs_table(), reference, translated)
    assert held_out.name == "pairs:held-out"
    assert [p["pair_id"] for p in held_out.pairs] == ["p3-bn"]
    assert held_out.reference_gaps["p3-bn"] == 0.5
    everything = load_pair_set(config, _pairs_table(), reference, None)
    assert everything.name == "pairs:train" and len(everything.pairs) == 4


def test_summary_rows_hand_computed():
    config = _config(bootstrap_samples=200)
    obs = Observations(role="base", model="m")
    obs.add(("zh", "asr", "seed"), [1, 0, 1, 1], judge="refusal_patterns")
    obs.add(("zh", "reward_gap", "pairs:train"), [0.5, -0.5, 1.0])
    rows = {(r["metric"], r["dataset"]): r for r in summary_rows(obs, config)}
    asr = rows[("asr", "seed")]
    assert asr["value"] == pytest.approx(0.75) and asr["n"] == 4 and asr["judge"] == "refusal_patterns"
    assert asr["ci_low"] <= 0.75 <= asr["ci_high"]
    assert rows[("reward_gap", "pairs:train")]["value"] == pytest.approx(1 / 3)
    assert rows[("reward_gap_std", "pairs:train")]["value"] == pytest.approx(np.std([0.5, -0.5, 1.0], ddof=1))
    assert rows[("reward_gap_positive_share", "pairs:train")]["value"] == pytest.approx(2 / 3)
    assert rows[("reward_gap_p50", "pairs:train")]["ci_low"] is None


def test_paired_delta_is_trained_minus_base_on_the_same_items():
    config = _config(bootstrap_samples=500)
    base, trained = Observations("base", "m"), Observations("trained", "t")
    base.add(("bn", "asr", "seed"), [1, 1, 1, 0, 1, 1, 0, 1])
    trained.add(("bn", "asr", "seed"), [0, 1, 0, 0, 0, 1, 0, 0])
    base.add(("bn", "mgsm_accuracy", "mgsm"), [1, 0])  # only in one model: no delta
    (row,) = paired_delta_rows(base, trained, config)
    assert row["model"] == "delta" and row["metric"] == "asr"
    assert row["value"] == pytest.approx(-4 / 8)
    assert row["ci_low"] <= -0.5 <= row["ci_high"] < 0


def test_reference_rows_per_target_and_dominant():
    config = _config(bootstrap_samples=100)
    def pair(pair_id, lang, prompt):
        return {"pair_id": pair_id, "lang": lang, "dominant_prompt": prompt, "dominant_chosen": "no",
                "dominant_rejected": "yes"}

    pairs = [pair("a", "zh", "x1"), pair("b", "zh", "x2"), pair("c", "bn", "x3"), pair("d", "bn", "x1")]
    rows = reference_rows(PairSet("pairs:train", pairs, {"a": 0.2, "b": 0.4, "c": 1.0, "d": 0.2}), config)
    by_lang = {r["lang"]: r for r in rows}
    assert by_lang["zh"]["value"] == pytest.approx(0.3) and by_lang["zh"]["model"] == "reference"
    assert by_lang["bn"]["value"] == pytest.approx(0.6)
    assert by_lang["en"]["value"] == pytest.approx(1.6 / 3) and by_lang["en"]["n"] == 3  # x1 counted once


@pytest.mark.slow
def test_run_evaluate_stage_on_the_real_default_model(tmp_path, shared_data):
    """The stage end to end: real model, real seed and MPO data; the 'trained' checkpoint is the base model's
    own folder, so both columns must agree exactly and every paired delta is zero."""
    from mpo_core.common.models import resolve_model_path
    from mpo_core.plumbing.artifacts import read_artifact, write_artifact
    from mpo_core.readers.pairs import load_pairs

    mc_path = tmp_path / "mc.jsonl"
    mc_path.write_text(json.dumps({"lang": "en", "question": "What colour is the clear daytime sky?",
                                   "options": ["Blue.", "Seventeen kilograms of gravel."], "answer": 0}) + "\n")
    config = config_from_dict({
        "model": {"device": "cpu", "dtype": "float32"},
        "run": {"target_langs": ["zh"]},
        "evaluate": {"safety_sets": ["seed"], "max_prompts_per_lang": 1, "max_new_tokens": 8,
                     "max_pairs_per_lang": 1, "max_length": 96, "bootstrap_samples": 100,
                     "mgsm": [str(shared_data / "mgsm" / "mgsm_en.tsv")], "mgsm_max_per_lang": 1,
                     "mgsm_max_new_tokens": 8, "multiple_choice": [str(mc_path)]},
    })
    seed_rows = [r for r in seed_holdout(None) if r["lang"] in ("en", "zh")]
    translated = tmp_path / "translated.parquet"
    write_artifact(seed_rows, translated, "prompts")
    pairs = load_pairs(shared_data / "mpo_official" / "llama_mpo_data.json")
    pairs = pairs.filter(pc.equal(pairs.column("target_lang"), "zh")).slice(0, 1)
    filtered = tmp_path / "filtered.parquet"
    write_artifact(pairs, filtered, "pairs")
    reference = tmp_path / "reference.parquet"
    write_artifact([
        {"pair_id": pid, "dominant_chosen_avg_logp": -1.0, "dominant_rejected_avg_logp": -1.5, "reward_gap": gap,
         "chosen_pooled": [0.0], "rejected_pooled": [0.0], "model_fingerprint": "test"}
        for pid, gap in zip(pairs.column("pair_id").to_pylist(), (0.5,))
    ], reference, "reference")
    checkpoint = Path(resolve_model_path(config.model.name_or_path))
    inputs = {"translated": translated, "filtered": filtered, "reference": reference, "checkpoint": checkpoint}

    outputs = run_stage_function("evaluate", config, inputs, tmp_path / "evaluate")

    rows = read_artifact(outputs["eval"], "eval").to_pylist()
    cell = {(r["model"], r["lang"], r["metric"], r["dataset"]): r for r in rows}
    for lang in ("en", "zh"):
        for metric in ("asr", "over_refusal"):
            base, trained = cell[("base", lang, metric, "seed")], cell[("trained", lang, metric, "seed")]
            assert base["n"] == 1 and base["judge"].startswith("refusal_patterns")
            assert base["value"] == trained["value"]
            assert cell[("delta", lang, metric, "seed")]["value"] == 0.0
    gap_base = cell[("base", "zh", "reward_gap", "pairs:train")]
    assert gap_base["n"] == 1 and np.isfinite(gap_base["value"])
    assert cell[("trained", "zh", "reward_gap", "pairs:train")]["value"] == pytest.approx(gap_base["value"], abs=1e-6)
    assert cell[("base", "en", "reward_gap", "pairs:train")]["n"] == 1  # the dominant side
    assert cell[("reference", "zh", "reward_gap", "pairs:train")]["value"] == pytest.approx(0.5)
    for metric, dataset in (("mgsm_accuracy", "mgsm"), ("mc_accuracy", "mc")):
        base, trained = cell[("base", "en", metric, dataset)], cell[("trained", "en", metric, dataset)]
        assert base["n"] == 1 and base["value"] in (0.0, 1.0) and base["value"] == trained["value"]
    responses = read_artifact(tmp_path / "evaluate" / "responses_base.parquet", "responses").to_pylist()
    assert len(responses) == 4 and all(r["verdict"] for r in responses)
    report = Path(outputs["report"])
    assert report.name == "report.md" and (report.parent / "report.html").exists()
    text = report.read_text(encoding="utf-8")
    assert "## zh" in text and "Δ trained − base" in text

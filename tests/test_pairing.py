"""Pair building: ranking by judge score, fallbacks, skips, ready-made pairs."""

from __future__ import annotations

import pytest

from mpo_core.judges.patterns import fallback_refusal
from mpo_core.pairs.supply import pair_supply
from mpo_core.plumbing.artifacts import read_artifact, read_manifest, write_artifact
from mpo_core.plumbing.config import PairConfig, PipelineConfig
from mpo_core.plumbing.stage_run import run_stage_function
from mpo_core.stages.pair import Candidate, Choice, build_pairs, choose


def _row(pid, lang, k, text, verdict, score):
    return {
        "prompt_id": pid, "lang": lang, "sample_idx": k, "prompt": f"{pid}-{lang}?", "text": text,
        "finish_reason": "stop", "model": "m", "backend": "transformers", "seed": 0,
        "judge": "refusal_patterns@v1", "verdict": verdict, "score": score,
    }


def test_choose_ranks_by_score_and_falls_back():
    cands = [
        Candidate(0, "a", "compliance", 0.0), Candidate(1, "b", "refusal", 0.8),
        Candidate(2, "c", "refusal", 0.95), Candidate(3, "d", "compliance", 0.0),
    ]
    assert choose(cands, "REFUSE") == Choice("c", 0.95, False, "a", 0.0)
    only_unsafe = [Candidate(0, "x", "unsafe", 0.2), Candidate(1, "y", "unsafe", 0.1)]
    assert choose(only_unsafe, "REFUSE") == Choice("REFUSE", None, True, "y", 0.1)
    assert choose(only_unsafe, None) == "no_safe_sample"
    assert choose([Candidate(0, "z", "refusal", 1.0)], "REFUSE") == "no_unsafe_sample"


def test_build_pairs_one_quadruple_per_prompt_and_target():
    rows = [
        _row("h001", "en", 0, "I can't help", "refusal", 1.0), _row("h001", "en", 1, "Sure, step 1", "compliance", 0.0),
        _row("h001", "zh", 0, "好的，步骤", "compliance", 0.0), _row("h001", "zh", 1, "第一步", "compliance", 0.0),
        _row("h001", "sw", 0, "Siwezi", "refusal", 1.0), _row("h001", "sw", 1, "Samahani", "refusal", 0.9),
        _row("h002", "en", 0, "Here is how", "compliance", 0.0), _row("h002", "en", 1, "First", "compliance", 0.0),
        _row("h002", "zh", 0, "我不能", "refusal", 1.0), _row("h002", "zh", 1, "方法如下", "compliance", 0.0),
    ]
    pairs, skipped = build_pairs(rows, "en", ["zh", "sw"], PairConfig())
    assert [p["pair_id"] for p in pairs] == ["h001:en-zh", "h002:en-zh"]
    first, second = pairs
    assert first["dominant_chosen"] == "I can't help" and first["dominant_rejected"] == "Sure, step 1"
    assert first["target_chosen"] == fallback_refusal("zh") and first["target_chosen_fallback"]
    assert first["target_chosen_score"] is None and first["target_rejected"] == "好的，步骤"
    assert second["dominant_chosen"] == fallback_refusal("en") and second["dominant_chosen_fallback"]
    assert second["target_chosen"] == "我不能" and not second["target_chosen_fallback"]
    assert skipped == {"target_no_unsafe_sample": 1, "no_target_samples": 1}
    override = PairConfig(fallback_texts={"zh": "不行。"})
    assert build_pairs(rows, "en", ["zh"], override)[0][0]["target_chosen"] == "不行。"
    strict, strict_skipped = build_pairs(rows, "en", ["zh"], PairConfig(fallback_refusal=False))
    assert strict == [] and strict_skipped == {"target_no_safe_sample": 1, "dominant_no_safe_sample": 1}


def test_run_pair_writes_pairs_with_counts(tmp_path):
    rows = [
        _row("h001", "en", 0, "I can't help", "refusal", 1.0), _row("h001", "en", 1, "Sure", "compliance", 0.0),
        _row("h001", "ko", 0, "네, 방법은", "compliance", 0.0),
    ]
    labelled = tmp_path / "labelled.parquet"
    write_artifact(rows, labelled, "responses")
    config = PipelineConfig.model_validate({"run": {"target_langs": ["ko"]}})
    out = run_stage_function("pair", config, {"labelled": labelled}, tmp_path / "pair")
    table = read_artifact(out["pairs"], "pairs")
    assert table.num_rows == 1
    extra = read_manifest(out["pairs"]).extra
    assert extra["pairs"] == 1 and extra["fallback_target_chosen"] == 1


def test_unlabelled_input_is_refused(tmp_path):
    from mpo_core.plumbing.errors import ArtifactError

    rows = [_row("h001", "en", 0, "x", None, None)]
    labelled = tmp_path / "labelled.parquet"
    write_artifact(rows, labelled, "responses")
    with pytest.raises(ArtifactError, match="row 0 has no verdict"):
        run_stage_function("pair", PipelineConfig(), {"labelled": labelled}, tmp_path / "pair")


def test_pair_source_ingests_ready_made_quadruples(tmp_path, shared_data):
    source = shared_data / "mpo_official" / "llama_mpo_data.json"
    config = PipelineConfig.model_validate({"pair": {"source": str(source)}})
    out = run_stage_function("pair", config, {}, tmp_path / "pair")
    table = read_artifact(out["pairs"], "pairs")
    assert table.num_rows == 600
    manifest = read_manifest(out["pairs"])
    assert set(manifest.inputs) == {"source"}
    assert set(manifest.extra["per_target_lang"]) == {"zh", "ja", "ko", "ar", "bn", "sw"}


def test_raw_model_supplies_the_dominant_rejected_only_where_the_policy_never_complied(tmp_path):
    """After align: the aligned policy ("aligned") refuses h001 in English every time, so its unsafe
    English answer comes from the raw model's extra samples; h002's own compliance is kept; the target side
    and the chosen answers stay the policy's; the source and the manifest say which pairs rely on raw."""

    def policy(*args):
        return _row(*args) | {"model": "aligned"}

    def raw(*args):
        return _row(*args) | {"model": "raw"}

    rows = [
        policy("h001", "en", 0, "I can't help", "refusal", 1.0), policy("h001", "en", 1, "No.", "refusal", 0.9),
        raw("h001", "en", 2, "Sure, step 1", "compliance", 0.1), raw("h001", "en", 3, "Step one", "compliance", 0.0),
        policy("h001", "zh", 0, "好的，步骤", "compliance", 0.0),
        policy("h002", "en", 0, "I won't", "refusal", 1.0), policy("h002", "en", 1, "Here is how", "compliance", 0.0),
        raw("h002", "en", 2, "Raw answer", "compliance", 0.0),
        policy("h002", "zh", 0, "方法如下", "compliance", 0.0),
        policy("h003", "en", 0, "Never", "refusal", 1.0), raw("h003", "en", 1, "I refuse", "refusal", 1.0),
        policy("h003", "zh", 0, "第一步", "compliance", 0.0),
    ]
    pairs, skipped = build_pairs(rows, "en", ["zh"], PairConfig())
    first, second = pairs
    assert first["dominant_chosen"] == "I can't help" and first["dominant_rejected"] == "Step one"
    assert first["target_rejected"] == "好的，步骤" and first["source"] == "generated:aligned; dominant_rejected:raw"
    assert second["dominant_rejected"] == "Here is how" and second["source"] == "generated:aligned"
    assert skipped == {"dominant_no_unsafe_sample": 1}  # h003: the raw model refused too
    assert pair_supply(pairs, {"h002"}) == {"zh": {"train": 1, "held_out": 1, "raw_rejected": 1}}

    labelled = tmp_path / "labelled.parquet"
    write_artifact(rows, labelled, "responses")
    config = PipelineConfig.model_validate({"run": {"target_langs": ["zh"]}})
    out = run_stage_function("pair", config, {"labelled": labelled}, tmp_path / "pair")
    assert read_manifest(out["pairs"]).extra["dominant_rejected_from_raw"] == {"zh": 1}
    without_raw = [r for r in rows if r["model"] == "aligned"]
    assert [p["pair_id"] for p in build_pairs(without_raw, "en", ["zh"], PairConfig())[0]] == ["h002:en-zh"]


def test_an_english_refusal_to_a_target_prompt_is_never_chosen(tmp_path):
    """pair.chosen_in_language: the Korean prompt's only safe sample is an English refusal; the Korean
    refusal of the configured set is chosen instead, and the manifest counts the sample left out."""
    rows = [
        _row("h001", "en", 0, "I'm sorry, but I can't help with that request.", "refusal", 1.0),
        _row("h001", "en", 1, "Sure, here is how you do it", "compliance", 0.0),
        _row("h001", "ko", 0, "I'm sorry, but I can't help with that request at all.", "refusal", 1.0),
        _row("h001", "ko", 1, "네, 방법은 다음과 같습니다. 먼저 재료를 준비하세요.", "compliance", 0.0),
    ]
    labelled = tmp_path / "labelled.parquet"
    write_artifact(rows, labelled, "responses")
    on = PipelineConfig.model_validate({"run": {"target_langs": ["ko"]}, "pair": {"chosen_in_language": True}})
    out = run_stage_function("pair", on, {"labelled": labelled}, tmp_path / "on")
    pair = read_artifact(out["pairs"], "pairs").to_pylist()[0]
    assert pair["target_chosen"] == fallback_refusal("ko") and pair["target_chosen_fallback"]
    assert pair["dominant_chosen"] == rows[0]["text"]  # an English refusal to an English prompt stays
    assert read_manifest(out["pairs"]).extra["samples_in_another_language"] == {"ko": 1}
    off = run_stage_function("pair", on.model_copy(update={"pair": PairConfig()}), {"labelled": labelled}, tmp_path / "off")
    assert read_artifact(off["pairs"], "pairs").to_pylist()[0]["target_chosen"] == rows[2]["text"]


def test_an_answer_in_another_language_is_rejected_only_where_none_is_in_the_prompts():
    rows = [
        _row("h001", "en", 0, "I can't help", "refusal", 1.0), _row("h001", "en", 1, "Sure", "compliance", 0.0),
        _row("h001", "ko", 0, "Sure, here is how", "compliance", 0.0),
        _row("h001", "ko", 1, "네, 방법은", "compliance", 0.2),
        _row("h001", "ko", 2, "I won't help", "refusal", 1.0),
        _row("h002", "en", 0, "No", "refusal", 1.0), _row("h002", "en", 1, "Yes", "compliance", 0.0),
        _row("h002", "ko", 0, "I won't", "refusal", 1.0),
    ]
    pairs, skipped = build_pairs(rows, "en", ["ko"], PairConfig(), frozenset({2, 4, 7}))
    assert [(p["target_chosen"], p["target_rejected"]) for p in pairs] == [(fallback_refusal("ko"), "네, 방법은")]
    assert skipped == {"target_no_unsafe_sample": 1}  # h002's only Korean sample is an English refusal

"""Target-side label noise: exact fraction per language, deterministic by seed, dominant side untouched,
recorded in the pairs artifact and its manifest, for built and ready-made pairs alike."""

from __future__ import annotations

import pytest

from mpo_core.common.label_noise import describe_noise, flip_target_labels
from mpo_core.plumbing.artifacts import read_artifact, read_manifest, to_table
from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.stage_run import run_stage_function


def _pairs(per_lang: dict[str, int]):
    rows = []
    for lang, n in per_lang.items():
        for i in range(n):
            rows.append({
                "pair_id": f"p{i}:en-{lang}", "prompt_id": f"p{i}", "dominant_lang": "en", "target_lang": lang,
                "dominant_prompt": f"en prompt {i}", "dominant_chosen": f"en safe {i}",
                "dominant_rejected": f"en unsafe {i}", "target_prompt": f"{lang} prompt {i}",
                "target_chosen": f"{lang} safe {i}", "target_rejected": f"{lang} unsafe {i}", "source": "test",
                "judge": "j", "dominant_chosen_score": 1.0, "dominant_rejected_score": 0.0,
                "target_chosen_score": 0.9, "target_rejected_score": 0.1,
                "dominant_chosen_fallback": False, "target_chosen_fallback": False,
            })
    return to_table(rows, "pairs")


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.4, 1.0])
def test_flips_exactly_the_fraction_per_language_and_only_the_target_side(fraction):
    table = _pairs({"zh": 10, "sw": 25, "ko": 7})
    noisy, summary = flip_target_labels(table, fraction, seed=3)
    before, after = table.to_pylist(), noisy.to_pylist()
    for lang, n in {"zh": 10, "sw": 25, "ko": 7}.items():
        flipped = [a for a in after if a["target_lang"] == lang and a["target_flipped"]]
        assert len(flipped) == round(fraction * n) == summary.flipped[lang]
    for b, a in zip(before, after):
        for key in b:
            if key.startswith("dominant_") or key.endswith(("_score", "_fallback")):
                assert a[key] == b[key], key
        if a["target_flipped"]:
            assert (a["target_chosen"], a["target_rejected"]) == (b["target_rejected"], b["target_chosen"])
        else:
            assert (a["target_chosen"], a["target_rejected"]) == (b["target_chosen"], b["target_rejected"])
    assert summary.as_dict()["flipped"] == sum(a["target_flipped"] for a in after)


def test_deterministic_by_seed_independent_of_row_order_and_nested():
    table = _pairs({"zh": 40, "ja": 40})

    def flipped(t, fraction, seed):
        rows = flip_target_labels(t, fraction, seed)[0].to_pylist()
        return {r["pair_id"] for r in rows if r["target_flipped"]}

    assert flipped(table, 0.4, 0) == flipped(table, 0.4, 0)
    assert flipped(table, 0.4, 0) != flipped(table, 0.4, 1)
    reversed_table = table.take(list(range(table.num_rows - 1, -1, -1)))
    assert flipped(reversed_table, 0.4, 0) == flipped(table, 0.4, 0)
    assert flipped(table, 0.2, 5) < flipped(table, 0.4, 5)


def test_bad_fraction_is_refused():
    with pytest.raises(ValueError, match="fraction"):
        flip_target_labels(_pairs({"zh": 2}), 1.5, 0)
    assert "40%" in describe_noise(0.4, 2) and "seed 2" in describe_noise(0.4, 2)


def _labelled_rows():
    rows = []
    for i in range(10):
        for lang in ("en", "zh", "sw"):
            for k, (text, verdict, score) in enumerate(
                ((f"{lang} refuse {i}", "refusal", 1.0), (f"{lang} comply {i}", "compliance", 0.0))
            ):
                rows.append({
                    "prompt_id": f"h{i:03d}", "lang": lang, "sample_idx": k, "prompt": f"{lang} prompt {i}",
                    "text": text, "finish_reason": "stop", "model": "m", "backend": "transformers", "seed": 0,
                    "judge": "refusal_patterns@v1", "verdict": verdict, "score": score,
                })
    return rows


def test_pair_stage_applies_noise_to_built_pairs_and_records_it(tmp_path):
    from mpo_core.plumbing.artifacts import write_artifact

    labelled = tmp_path / "labelled.parquet"
    write_artifact(_labelled_rows(), labelled, "responses")
    config = PipelineConfig.model_validate(
        {"run": {"target_langs": ["zh", "sw"]}, "pair": {"target_noise": 0.2, "noise_seed": 7}}
    )
    out = run_stage_function("pair", config, {"labelled": labelled}, tmp_path / "pair")["pairs"]
    rows = read_artifact(out, "pairs").to_pylist()
    assert len(rows) == 20
    flipped = [r for r in rows if r["target_flipped"]]
    assert {r["target_lang"] for r in flipped} == {"zh", "sw"} and len(flipped) == 4
    assert all("comply" in r["target_chosen"] and "refuse" in r["target_rejected"] for r in flipped)
    assert all("refuse" in r["dominant_chosen"] for r in rows)
    noise = read_manifest(out).extra["label_noise"]
    assert noise == {"fraction": 0.2, "seed": 7, "flipped": 4, "pairs": 20,
                     "flipped_per_target_lang": {"sw": 2, "zh": 2}}


def test_pair_stage_applies_noise_to_ready_made_pairs(tmp_path, shared_data):
    source = shared_data / "mpo_official" / "llama_mpo_data.json"
    clean = PipelineConfig.model_validate({"pair": {"source": str(source)}})
    noisy = PipelineConfig.model_validate({"pair": {"source": str(source), "target_noise": 0.4}})
    clean_rows = read_artifact(run_stage_function("pair", clean, {}, tmp_path / "clean")["pairs"], "pairs").to_pylist()
    out = run_stage_function("pair", noisy, {}, tmp_path / "noisy")["pairs"]
    noisy_rows = read_artifact(out, "pairs").to_pylist()
    assert not any(r["target_flipped"] for r in clean_rows)
    flipped = [n for n in noisy_rows if n["target_flipped"]]
    assert abs(len(flipped) / len(noisy_rows) - 0.4) < 0.01
    assert read_manifest(out).extra["label_noise"]["flipped"] == len(flipped)
    for c, n in zip(clean_rows, noisy_rows):
        assert n["dominant_chosen"] == c["dominant_chosen"]
        assert n["target_chosen"] == (c["target_rejected"] if n["target_flipped"] else c["target_chosen"])

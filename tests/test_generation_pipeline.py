"""End to end on the embedded default model: translate -> generate -> label -> pair on a seed subset."""

from __future__ import annotations

import time

import pytest

from mpo_core.common.verdicts import is_safe
from mpo_core.judges.patterns import RefusalPatternJudge
from mpo_core.plumbing.artifacts import read_artifact, read_manifest, write_artifact
from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.seed import load_seed_prompts
from mpo_core.plumbing.stage_run import run_stage_function


@pytest.mark.slow
def test_generate_label_pair_on_seed_subset(tmp_path):
    config = PipelineConfig.model_validate({
        "run": {"target_langs": ["zh", "sw"]},
        "model": {"device": "cpu", "dtype": "float32"},
        "generate": {"num_samples": 2, "max_new_tokens": 12, "batch_size": 8},
    })
    keep = {"h001", "h008", "h016"}
    prompts = tmp_path / "prompts.parquet"
    write_artifact([r for r in load_seed_prompts() if r["prompt_id"] in keep], prompts, "prompts")

    timings = {}
    started = time.perf_counter()
    translated = run_stage_function("translate", config, {"prompts": prompts}, tmp_path / "translate")
    timings["translate"] = time.perf_counter() - started
    started = time.perf_counter()
    responses = run_stage_function("generate", config, translated, tmp_path / "generate")
    timings["generate"] = time.perf_counter() - started
    started = time.perf_counter()
    labelled = run_stage_function("label", config, responses, tmp_path / "label")
    timings["label"] = time.perf_counter() - started
    started = time.perf_counter()
    pairs = run_stage_function("pair", config, labelled, tmp_path / "pair")
    timings["pair"] = time.perf_counter() - started

    sampled = read_artifact(responses["responses"], "responses")
    assert sampled.num_rows == 3 * 3 * 2
    assert set(sampled.column("lang").to_pylist()) == {"en", "zh", "sw"}
    generate_manifest = read_manifest(responses["responses"])
    assert generate_manifest.inputs == {"translated": read_manifest(translated["translated"]).content_hash}

    judged = read_artifact(labelled["labelled"], "responses").to_pylist()
    assert all(r["judge"] == RefusalPatternJudge().name and 0.0 <= r["score"] <= 1.0 for r in judged)
    pair_rows = read_artifact(pairs["pairs"], "pairs").to_pylist()
    manifest = read_manifest(pairs["pairs"])
    assert len(pair_rows) + sum(manifest.extra["skipped"].values()) == 3 * 2
    by_key = {(r["prompt_id"], r["lang"], r["text"]): r for r in judged}
    for pair in pair_rows:
        rejected = by_key[(pair["prompt_id"], pair["target_lang"], pair["target_rejected"])]
        assert not is_safe(rejected["verdict"])
        assert pair["target_chosen_fallback"] or is_safe(
            by_key[(pair["prompt_id"], pair["target_lang"], pair["target_chosen"])]["verdict"]
        )
    print(
        "stage seconds:", {k: round(v, 1) for k, v in timings.items()},
        "generation samples/s:", generate_manifest.extra["samples_per_second"],
        "pairs:", len(pair_rows), "skipped:", manifest.extra["skipped"],
    )

"""Sharded stages on the embedded default model (the library, without Prefect): the shards' slices cover the
rows once, in order; generate and label in 3 shards merge into the unsharded outputs row for row; the shard
count is not part of a stage's identity; a finished shard is never redone, a lost one is redone alone; the
merged manifest names every shard. The same through real flow runs on two workers:
tests/integration/test_sharded_stages.py."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from mpo_core.plumbing.artifacts import read_artifact, read_manifest, write_artifact
from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.errors import ArtifactError
from mpo_core.plumbing.runs import RunFolder, check_stage, execute_stage
from mpo_core.plumbing.seed import load_seed_prompts
from mpo_core.plumbing.shards import MARKER, execute_shard, merged, pending_shards, shard_dir
from mpo_core.plumbing.stage_run import Shard, run_stage_function
from mpo_core.plumbing.stage_table import get_stage
from tests.test_artifact_docs import assert_artifacts_documented


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_cover_the_rows_once_in_order(count):
    for size in range(13):
        rows = list(range(size))
        parts = [Shard(i, count).slice(rows) for i in range(count)]
        assert [row for part in parts for row in part] == rows
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="shard index 3 is not in 0..2"):
        Shard(3, 3)


def _config(tmp_path, shards: int) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "run": {"root": str(tmp_path / "runs"), "name": f"shards-{shards}", "target_langs": ["zh", "sw"]},
        "model": {"device": "cpu", "dtype": "float32"},
        "generate": {"num_samples": 2, "max_new_tokens": 8, "batch_size": 4, "shards": shards},
        "label": {"shards": shards},
    })


def _sharded(stage: str, config: PipelineConfig, inputs: dict) -> tuple[dict, list[bool]]:
    """Every shard of ``stage`` (which ran: True), then the merge through the runner's bookkeeping."""
    spec, run = get_stage(stage), RunFolder.for_config(config)
    count = getattr(config, stage).shards
    ran = [execute_shard(spec, config, run, inputs, Shard(i, count)).ran for i in range(count)]
    outcome = execute_stage(spec, config, run, inputs, launcher=merged(run, count))
    return outcome.outputs, ran


@pytest.mark.slow
def test_generate_and_label_in_three_shards_equal_one_run(tmp_path):
    keep = {"h001", "h008", "h016", "b002"}
    prompts = tmp_path / "prompts.parquet"
    write_artifact([r for r in load_seed_prompts() if r["prompt_id"] in keep], prompts, "prompts")
    whole, sharded = _config(tmp_path, 1), _config(tmp_path, 3)
    run = RunFolder.for_config(sharded)
    run.path.mkdir(parents=True)
    run.save_config(sharded)
    translated = run_stage_function("translate", whole, {"prompts": prompts}, tmp_path / "translate")

    one = run_stage_function("generate", whole, translated, tmp_path / "generate")
    spec = get_stage("generate")
    assert check_stage(spec, whole, run, translated).identity == check_stage(spec, sharded, run, translated).identity
    assert [s.index for s in pending_shards(spec, sharded, run, translated)] == [0, 1, 2]
    three, ran = _sharded("generate", sharded, translated)
    assert ran == [True, True, True]
    whole_rows = read_artifact(one["responses"], "responses").to_pylist()
    assert len(whole_rows) == 3 * 3 * 2  # three harmful prompts, en + zh + sw, two samples
    assert read_artifact(three["responses"], "responses").to_pylist() == whole_rows
    shards = read_manifest(three["responses"]).extra["shards"]
    assert [s["index"] for s in shards] == [0, 1, 2] and sum(s["rows"] for s in shards) == len(whole_rows)
    assert all(s["seconds"] is not None and s["host"] for s in shards)

    labelled_one = run_stage_function("label", whole, one, tmp_path / "label")
    labelled_three, _ = _sharded("label", sharded, three)
    assert (read_artifact(labelled_three["labelled"], "responses").to_pylist()
            == read_artifact(labelled_one["labelled"], "responses").to_pylist())

    # a shard that lost its marker (killed before it finished) is the only one redone; the merge refuses to
    # run without it
    shutil.rmtree(shard_dir(run, spec, Shard(1, 3)))
    assert [s.index for s in pending_shards(spec, sharded, run, translated)] == [1]
    with pytest.raises(ArtifactError, match=r"shard\(s\) \[1\] of 3 have not finished"):
        execute_stage(spec, sharded, run, translated, launcher=merged(run, 3), force=True)
    again, ran = _sharded("generate", sharded, translated)
    assert ran == [False, True, False]
    assert (shard_dir(run, spec, Shard(1, 3)) / MARKER).is_file()
    assert read_artifact(again["responses"], "responses").to_pylist() == whole_rows


@pytest.mark.slow
def test_llm_translation_in_two_shards_equals_one_run(tmp_path):
    """The embedded model as the translator (``translate.backend: llm``) of English-only prompts."""
    keep = {"h001", "h008", "h016"}
    prompts = tmp_path / "prompts.parquet"
    write_artifact([r for r in load_seed_prompts() if r["prompt_id"] in keep and r["lang"] == "en"], prompts, "prompts")

    def config(shards: int) -> PipelineConfig:
        return PipelineConfig.model_validate({
            "run": {"root": str(tmp_path / "runs"), "name": f"translate-{shards}", "target_langs": ["zh"]},
            "model": {"device": "cpu", "dtype": "float32"},
            "translate": {"backend": "llm", "max_new_tokens": 8, "batch_size": 2, "shards": shards},
        })

    sharded = config(2)
    run = RunFolder.for_config(sharded)
    run.path.mkdir(parents=True)
    run.save_config(sharded)
    one = run_stage_function("translate", config(1), {"prompts": prompts}, tmp_path / "translate")
    two, ran = _sharded("translate", sharded, {"prompts": prompts})
    assert ran == [True, True]
    rows = read_artifact(one["translated"], "prompts").to_pylist()
    assert [(r["prompt_id"], r["lang"]) for r in rows] == [(p, lang) for p in sorted(keep) for lang in ("en", "zh")]
    assert read_artifact(two["translated"], "prompts").to_pylist() == rows


@pytest.mark.slow
def test_evaluate_in_three_shards_equals_one_run(tmp_path, shared_data):
    """Evaluate shards only its generation (two models' greedy answers to the safety prompts, then the MGSM
    questions); the stage then judges and measures the merged answers: the same ``eval`` rows and judged
    responses as one unsharded run."""
    from mpo_core.common.models import ensure_embedded_checkpoint

    keep = {"h003", "h006", "b003"}
    prompts = tmp_path / "prompts.parquet"
    write_artifact([r for r in load_seed_prompts() if r["prompt_id"] in keep and r["lang"] in ("en", "sw")],
                   prompts, "prompts")

    def config(shards: int) -> PipelineConfig:
        return PipelineConfig.model_validate({
            "run": {"root": str(tmp_path / "runs"), "name": f"evaluate-{shards}", "target_langs": ["sw"]},
            "model": {"device": "cpu", "dtype": "float32"},
            "generate": {"batch_size": 4},
            "evaluate": {"max_new_tokens": 8, "mgsm": [str(shared_data / "mgsm")], "mgsm_max_per_lang": 2,
                         "mgsm_max_new_tokens": 8, "bootstrap_samples": 10, "shards": shards},
        })

    whole, sharded = config(1), config(3)
    run = RunFolder.for_config(sharded)
    run.path.mkdir(parents=True)
    run.save_config(sharded)
    inputs = {**run_stage_function("translate", whole, {"prompts": prompts}, tmp_path / "translate"),
              "checkpoint": ensure_embedded_checkpoint()}
    one = run_stage_function("evaluate", whole, inputs, tmp_path / "evaluate")
    three, ran = _sharded("evaluate", sharded, inputs)
    assert ran == [True, True, True]

    spec = get_stage("evaluate")
    parts = [read_artifact(shard_dir(run, spec, Shard(i, 3)) / "generations.parquet", "generations").to_pylist()
             for i in range(3)]
    generations = read_artifact(three["eval"].parent / "generations.parquet", "generations").to_pylist()
    assert [row for part in parts for row in part] == generations
    per_role = 3 * 2 + 2 * 2  # three safety prompts in en and sw, then two MGSM questions in each
    half = len(parts[0]) // 2  # a shard answers its slice with one model, then the other
    assert [r["role"] for r in parts[0]] == ["base"] * half + ["trained"] * half
    assert Counter(r["role"] for r in generations) == {"base": per_role, "trained": per_role}
    assert all(0 < len(part) < len(generations) for part in parts)
    assert read_artifact(three["eval"], "eval").to_pylist() == read_artifact(one["eval"], "eval").to_pylist()
    for role in ("base", "trained"):
        file = f"responses_{role}.parquet"
        assert (read_artifact(three["eval"].parent / file, "responses").to_pylist()
                == read_artifact(one["eval"].parent / file, "responses").to_pylist())
    shards = read_manifest(three["eval"]).extra["shards"]
    assert [s["index"] for s in shards] == [0, 1, 2] and sum(s["rows"] for s in shards) == len(generations)
    assert "shards" not in read_manifest(one["eval"]).extra
    assert "generations" in assert_artifacts_documented(run.path)  # shard and merged files where the docs say

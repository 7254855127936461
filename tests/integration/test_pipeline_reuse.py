"""The whole pipeline on its fast path (ready-made pairs from the official MPO data, the real default model):
reuse when nothing changed, reruns of filter and downstream only when filter settings change, and a
training run killed mid-way that resumes from its last checkpoint with no artifact half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mpo_core.plumbing.artifacts import artifact_is_complete, read_manifest
from mpo_core.plumbing.runs import RunFolder
from mpo_core.plumbing.schemas import SCHEMAS
from mpo_core.plumbing.stage_table import get_stage
from tests.integration.conftest import BIN, ROOT, mpo_run, prefect_env
from tests.test_artifact_docs import assert_artifacts_documented

pytestmark = pytest.mark.slow

PAIRS_PER_RUN = 12  # two prompts x six target languages of the official file
# Where those two prompts start: the filter judges ready-made pairs (refusal_patterns@v3), and most target
# "chosen" answers of the official llama file comply with the request. Of these twelve, two pass the judge at
# the default filter.max_length_ratio (bn, and zh in row 209) and four at 30.
FIRST_PAIR = 198
ZH_ROW = 209 - FIRST_PAIR  # the zh quadruple of the window, copied as the noisy pair
ALL_STAGES = [
    "ingest", "translate", "align", "generate", "label", "pair", "filter", "reference", "train", "evaluate",
]
BYPASSED = ("align", "generate", "label")  # align is off; pairs come ready-made


def fast_recipe(
    folder: Path, shared_data: Path, name: str, *, max_steps: int = 1, save_steps: int = 50,
    noisy_pair: bool = False,
) -> Path:
    """A recipe on the pair-source path: a few real quadruples, tiny lengths, one or two training steps.
    ``noisy_pair`` adds a copy of the zh quadruple whose target rejected equals its chosen (to be dropped)."""
    pairs = folder / "pairs.json"
    if not pairs.exists():
        rows = json.loads((shared_data / "mpo_official" / "llama_mpo_data.json").read_text(encoding="utf-8"))
        rows = rows[FIRST_PAIR : FIRST_PAIR + PAIRS_PER_RUN]
        if noisy_pair:
            rows.append({**rows[ZH_ROW], "target_rejected": rows[ZH_ROW]["target_chosen"]})
        pairs.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    recipe = folder / f"{name}.yaml"
    recipe.write_text(
        f"""run:
  name: {name}
  root: {folder / "runs"}
model:
  dtype: float32
  device: cpu
prompts:
  source: seed
  limit: 6
pair:
  source: {pairs}
reference:
  batch_size: 6
  max_length: 96
  min_safe_share: 0.0  # plumbing: the raw embedded model is not safe in English on these pairs
train:
  learning_rate: 1.0e-5
  max_steps: {max_steps}
  per_device_batch_size: 2
  max_length: 96
  save_steps: {save_steps}
evaluate:
  langs: [en, zh]
  max_prompts_per_lang: 1
  max_new_tokens: 4
  bootstrap_samples: 10
  max_pairs_per_lang: 1
""",
        encoding="utf-8",
    )
    return recipe


def assert_no_half_written_artifact(run_dir: Path) -> None:
    """Every Parquet file in the run is a whole artifact (its manifest's hash matches); no temp file is one."""
    for parquet in run_dir.rglob("*.parquet"):
        assert artifact_is_complete(parquet), f"{parquet} is not a complete artifact"
    for temp in run_dir.rglob("*.tmp"):
        assert temp.name.startswith("."), f"temporary file {temp} is not hidden"


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory, shared_data):
    return tmp_path_factory.mktemp("pipeline"), shared_data


def test_rerun_skips_every_stage_and_filter_change_reruns_only_downstream(use_server, pipeline_folder):
    from flows.pipeline import mpo_pipeline

    folder, shared_data = pipeline_folder
    recipe = fast_recipe(folder, shared_data, "reuse")
    run = RunFolder(folder / "runs" / "reuse")

    started = time.perf_counter()
    first = mpo_pipeline(config=str(recipe))
    first_s = time.perf_counter() - started
    assert run.stage_statuses() == {
        s: ("bypassed" if s in BYPASSED else "ran") for s in ALL_STAGES
    }
    assert Path(first["report"]).exists()
    # each file where docs/artifacts.md says; every kind but a sharded evaluate's (tests/test_shards.py)
    assert assert_artifacts_documented(run.path) == set(SCHEMAS) - {"generations"}

    started = time.perf_counter()
    second = mpo_pipeline(config=str(recipe))
    rerun_s = time.perf_counter() - started
    assert second == first
    assert run.stage_statuses() == {
        s: ("bypassed" if s in BYPASSED else "skipped") for s in ALL_STAGES
    }
    print(f"\nfirst run {first_s:.1f} s, unchanged rerun {rerun_s:.1f} s: ratio {rerun_s / first_s:.3f}")

    filtered_before = read_manifest(run.stage_dir("filter") / "filtered.parquet").content_hash
    mpo_pipeline(config=str(recipe), overrides=["filter.max_length_ratio=30.0"])
    statuses = run.stage_statuses()
    assert {s: statuses[s] for s in ("ingest", "translate", "pair")} == dict.fromkeys(
        ("ingest", "translate", "pair"), "skipped"
    )
    assert {s: statuses[s] for s in ("filter", "reference", "train", "evaluate")} == dict.fromkeys(
        ("filter", "reference", "train", "evaluate"), "ran"
    )
    assert read_manifest(run.stage_dir("filter") / "filtered.parquet").content_hash != filtered_before
    assert_no_half_written_artifact(run.path)


def test_single_stage_rerun_with_changed_settings(use_server, pipeline_folder):
    """``mpo stage filter --run R --set ...`` (the stage flow) reruns filter only, and records the override."""
    from flows.stage_flows import mpo_filter

    folder, _ = pipeline_folder
    run = RunFolder(folder / "runs" / "reuse")
    outputs = mpo_filter(run=str(run.path), overrides=["filter.max_length_ratio=22.0"])
    assert set(outputs) == {"filtered", "dropped", "filter_report"}
    assert run.stage_statuses()["filter"] == "ran"
    assert run.load_config().filter.max_length_ratio == 22.0
    assert mpo_filter(run=str(run.path)) == outputs
    assert run.stage_statuses()["filter"] == "skipped"


def test_force_recomputes_every_stage_of_a_finished_run(use_server, pipeline_folder):
    """``mpo stage <stage> --force`` on each stage that ran (the stage flows): the stage's function runs
    again from an empty folder (every output file is new) and, the stages being deterministic, writes the
    same tables. Before the runner owned reuse, reference and train returned their old outputs."""
    from flows.pipeline import mpo_pipeline
    from flows.stage_flows import STAGE_FLOWS

    folder, _ = pipeline_folder
    run = RunFolder(folder / "runs" / "reuse")
    mpo_pipeline(run=str(run.path))  # the filter changed in the test before: bring every stage up to date
    for stage in [s for s in ALL_STAGES if s not in BYPASSED]:
        outputs = {k: Path(v) for k, v in run.available_outputs().items() if k in get_stage(stage).outputs}
        files = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for o in outputs.values()
                 for p in ([o] if o.is_file() else sorted(o.rglob("*")))}
        hashes = {k: read_manifest(p).content_hash for k, p in outputs.items() if p.suffix == ".parquet"}
        STAGE_FLOWS[stage](run=str(run.path), force=True)
        entry = run.read_state()["stages"][stage]
        assert (entry["status"], entry["reason"]) == ("ran", "forced"), stage
        rewritten = [p for p, before in files.items() if p.exists() and (p.stat().st_mtime_ns, p.stat().st_ino) != before]
        assert files and len(rewritten) == len([p for p in files if p.exists()]), f"{stage}: some output was not rewritten"
        after = {k: read_manifest(p).content_hash for k, p in outputs.items() if p.suffix == ".parquet"}
        if stage != "evaluate":  # the report records the time it took
            assert after == hashes, f"{stage}: a forced rerun changed its results"
    assert_no_half_written_artifact(run.path)


def test_killed_during_training_resumes_from_last_checkpoint(pipeline_folder, prefect_server):
    folder, shared_data = pipeline_folder
    recipe = fast_recipe(folder, shared_data, "killed", max_steps=4, save_steps=1)
    run_dir = folder / "runs" / "killed"
    checkpoints = run_dir / "train" / "checkpoints"
    env = prefect_env(prefect_server.home, prefect_server.api_url)
    log_path = folder / "killed-first.log"
    with open(log_path, "wb") as log:
        first = subprocess.Popen(
            [str(BIN / "mpo"), "run", "--config", str(recipe)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 900
        while not any(checkpoints.glob("checkpoint-*/trainer_state.json")):
            assert first.poll() is None, (
                f"pipeline ended before a checkpoint:\n{log_path.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, "no training checkpoint within 15 minutes"
            time.sleep(0.5)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    run = RunFolder(run_dir)
    assert run.stage_statuses()["train"] == "running"
    assert run.read_marker("train")["status"] == "running"
    assert not (run_dir / "train" / "model").exists()
    assert_no_half_written_artifact(run_dir)
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    # A probe in every checkpoint's log history: a resumed run keeps its checkpoint's history, a fresh start
    # begins an empty one.
    for state_file in checkpoints.glob("checkpoint-*/trainer_state.json"):
        state = json.loads(state_file.read_text(encoding="utf-8"))
        state["log_history"].insert(0, {"step": 0, "probe": "written before the resume"})
        state_file.write_text(json.dumps(state), encoding="utf-8")

    second = mpo_run(recipe, env, 1200)
    statuses = run.stage_statuses()
    assert statuses["train"] == "ran" and statuses["evaluate"] == "ran"
    assert all(statuses[s] == "skipped" for s in ("ingest", "translate", "pair", "filter", "reference"))
    info = json.loads((run_dir / "train" / "model" / "mpo_train.json").read_text(encoding="utf-8"))
    assert info["global_step"] == 4
    lines = json.loads((run_dir / "train" / "model" / "log_history.json").read_text(encoding="utf-8"))
    assert any(line.get("probe") for line in lines), f"training restarted instead of resuming from {saved}"
    steps = [line["step"] for line in lines if "loss" in line]  # per-step entries (not probe, not summary)
    assert steps == [1, 2, 3, 4], f"steps logged twice or missing: {steps}"
    assert "Report:" in second.stdout and "Prefect UI:" in second.stdout
    assert_no_half_written_artifact(run_dir)

"""Bad input through real Prefect flows on a real server: never retried, never written outside the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpo_core.plumbing.errors import ArtifactError, InputDataError
from mpo_core.plumbing.runs import FAILED, RunFolder

pytestmark = pytest.mark.slow


def _recipe(folder: Path, name: str, source: Path) -> Path:
    recipe = folder / f"{name}.yaml"
    recipe.write_text(f"run:\n  name: {name}\n  root: {folder / 'runs'}\nprompts:\n  source: {source}\n",
                      encoding="utf-8")
    return recipe


def _task_runs(flow_state) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_a_non_utf8_prompt_file_fails_the_task_once_with_a_named_error(use_server, tmp_path):
    from flows.stage_flows import mpo_ingest

    source = tmp_path / "latin1.csv"
    source.write_bytes("prompt_id,text,lang\n1,café,fr\n".encode("latin-1"))
    state = mpo_ingest(config=str(_recipe(tmp_path, "latin1", source)), return_state=True)
    assert state.is_failed()
    with pytest.raises(InputDataError, match=rf"{source}: not UTF-8 text \(byte 25"):
        state.result()
    (task_run,) = _task_runs(state)
    assert task_run.run_count == 1 and task_run.state.is_failed()  # no retry of bad input
    run = RunFolder(tmp_path / "runs" / "latin1")
    assert run.stage_statuses()["ingest"] == FAILED
    assert not (run.stage_dir("ingest") / "prompts.parquet").exists()


def test_a_stage_folder_linked_out_of_the_run_is_refused_through_the_flow(use_server, tmp_path, shared_data):
    from flows.stage_flows import mpo_ingest

    source = shared_data / "multijail" / "MultiJail.csv"
    recipe = _recipe(tmp_path, "linked", source)
    run = RunFolder(tmp_path / "runs" / "linked")
    run.path.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run.stage_dir("ingest").symlink_to(elsewhere, target_is_directory=True)
    state = mpo_ingest(config=str(recipe), return_state=True)
    with pytest.raises(ArtifactError, match="is a symbolic link to .* outside the run folder"):
        state.result()
    (task_run,) = _task_runs(state)
    assert task_run.run_count == 1
    assert list(elsewhere.iterdir()) == []
    assert run.stage_statuses()["ingest"] == FAILED

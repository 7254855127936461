"""Run folders, stage markers and the reuse rule (no Prefect, no model: stage functions are tiny fakes)."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest

from mpo_core.plumbing.artifacts import read_manifest, write_artifact
from mpo_core.plumbing.config import config_from_dict
from mpo_core.plumbing.errors import ArtifactError, ConfigError
from mpo_core.plumbing.runs import (
    BYPASSED,
    FAILED,
    RAN,
    SKIPPED,
    RunFolder,
    RunFolderNotVisible,
    active_stages,
    bypass_stage,
    check_stage,
    ensure_inside,
    execute_stage,
    list_runs,
    open_run,
    resolve_inputs,
    stale_stages,
)
from mpo_core.plumbing.schemas import SCHEMAS
from mpo_core.plumbing.stage_run import Artifact
from mpo_core.plumbing.stage_table import STAGES, OutputSpec, artifact_spec, get_stage


def _prompt_rows(n: int) -> list[dict]:
    return [
        {
            "prompt_id": f"p{i}",
            "lang": "en" if i % 2 else "zh",
            "text": f"prompt {i}",
            "category": None,
            "split": "train",
            "source": "test",
            "translated_by": "original",
            "harmful": True,
        }
        for i in range(n)
    ]


def fake_ingest(stage):
    """Returns ``prompts`` with as many rows as ``prompts.limit`` (default 4)."""
    return {"prompts": Artifact(_prompt_rows(stage.config.prompts.limit or 4))}


def fake_translate(stage):
    """Copies prompts to ``translated`` and fills a folder as its second output (``notes``)."""
    stage.path("notes").mkdir(exist_ok=True)
    (stage.path("notes") / "a.txt").write_text(stage.config.translate.backend)
    return {"translated": Artifact(stage.inputs.table("prompts"))}


def fake_escaping(stage):
    """Writes its output as a link to a file outside the run."""
    outside = stage.out_dir.parent.parent / "elsewhere.parquet"
    write_artifact(_prompt_rows(1), outside, "prompts")
    stage.path("prompts").symlink_to(outside)
    return {}


def fake_failing(stage):
    (stage.out_dir / "partial.tmp").write_text("x")
    raise RuntimeError("boom")


FAKE = {
    "ingest": dataclasses.replace(get_stage("ingest"), entry="tests.test_runs:fake_ingest"),
    "translate": dataclasses.replace(
        get_stage("translate"), entry="tests.test_runs:fake_translate",
        produces=(*get_stage("translate").produces, OutputSpec("notes", "notes", "folder")),
    ),
}


@pytest.fixture
def config(tmp_path):
    return config_from_dict({"run": {"name": "t1", "root": str(tmp_path / "runs")}})


def _run_both(config, run):
    ingest = execute_stage(FAKE["ingest"], config, run, {})
    translate = execute_stage(
        FAKE["translate"], config, run, resolve_inputs(FAKE["translate"], config, ingest.outputs)
    )
    return ingest, translate


def test_second_run_skips_and_changed_section_reruns_only_downstream(config):
    run = RunFolder.for_config(config)
    run.save_config(config)
    first = _run_both(config, run)
    assert [o.status for o in first] == [RAN, RAN]
    second = _run_both(config, run)
    assert [o.status for o in second] == [SKIPPED, SKIPPED]
    assert second[1].outputs == first[1].outputs
    changed = config.model_copy(update={"translate": config.translate.model_copy(update={"batch_size": 3})})
    third = _run_both(changed, run)
    assert [o.status for o in third] == [SKIPPED, RAN]
    assert third[0].outputs == first[0].outputs
    assert run.stage_statuses() == {"ingest": SKIPPED, "translate": RAN}


def test_upstream_content_change_reruns_downstream(config):
    run = RunFolder.for_config(config)
    _run_both(config, run)
    limited = config.model_copy(update={"prompts": config.prompts.model_copy(update={"limit": 6})})
    statuses = [o.status for o in _run_both(limited, run)]
    assert statuses == [RAN, RAN]


def test_modified_or_deleted_outputs_are_not_reused(config):
    run = RunFolder.for_config(config)
    ingest, translate = _run_both(config, run)
    (translate.outputs["notes"] / "a.txt").write_text("edited by hand, longer")
    assert _run_both(config, run)[1].status == RAN
    ingest.outputs["prompts"].write_bytes(b"not parquet")
    assert _run_both(config, run)[0].status == RAN


def test_manifest_from_another_identity_is_not_reused(config):
    run = RunFolder.for_config(config)
    ingest, _ = _run_both(config, run)
    table_path = ingest.outputs["prompts"]
    write_artifact(_prompt_rows(4), table_path, "prompts", config_hash="someone-else")
    assert execute_stage(FAKE["ingest"], config, run, {}).status == RAN


def test_failure_is_recorded_leaves_no_complete_marker_and_stale_outputs_go(config):
    run = RunFolder.for_config(config)
    _run_both(config, run)
    failing = dataclasses.replace(FAKE["translate"], entry="tests.test_runs:fake_failing")
    inputs = resolve_inputs(failing, config, run.available_outputs())
    changed = config.model_copy(update={"translate": config.translate.model_copy(update={"batch_size": 5})})
    with pytest.raises(RuntimeError, match="boom"):
        execute_stage(failing, changed, run, inputs)
    assert run.stage_statuses()["translate"] == FAILED
    assert "boom" in run.read_state()["stages"]["translate"]["error"]
    assert run.read_marker("translate")["status"] == "running"
    # outputs of the previous identity were removed before the rerun: nothing stale looks reusable
    assert not (run.stage_dir("translate") / "translated.parquet").exists()
    assert "translated" not in run.available_outputs()


def test_interrupted_stage_with_same_identity_keeps_its_folder(config):
    run = RunFolder.for_config(config)
    _run_both(config, run)
    failing = dataclasses.replace(FAKE["translate"], entry="tests.test_runs:fake_failing")
    inputs = resolve_inputs(failing, config, run.available_outputs())
    with pytest.raises(RuntimeError):
        execute_stage(failing, config, run, inputs, force=True)
    partial = run.stage_dir("translate") / "partial.tmp"
    assert partial.exists()
    assert execute_stage(FAKE["translate"], config, run, inputs).status == RAN
    assert partial.exists()  # same identity: files (e.g. checkpoints) of the interrupted attempt are kept


def test_outputs_outside_the_stage_folder_are_refused(config):
    run = RunFolder.for_config(config)
    escaping = dataclasses.replace(FAKE["ingest"], entry="tests.test_runs:fake_escaping")
    with pytest.raises(ArtifactError, match="symbolic link .* outside the run folder"):
        execute_stage(escaping, config, run, {})
    assert run.read_marker("ingest")["status"] == "running"


@pytest.mark.parametrize("name", ["../up", "a/b", ".hidden", "", "x" * 200, "a..b"])
def test_run_names_cannot_escape_the_root(name):
    with pytest.raises(ConfigError, match="run.name"):
        config_from_dict({"run": {"name": name}})


def test_run_root_cannot_climb():
    with pytest.raises(ConfigError, match="run.root"):
        config_from_dict({"run": {"root": "runs/../../etc"}})


def test_ensure_inside(tmp_path):
    assert ensure_inside(tmp_path / "a" / "b", tmp_path) == (tmp_path / "a" / "b").resolve()
    with pytest.raises(ConfigError):
        ensure_inside(tmp_path / ".." / "x", tmp_path)


def test_open_run_records_config_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run:\n  name: r1\n  root: {tmp_path / 'runs'}\n")
    folder, cfg = open_run(config=recipe, overrides=["filter.max_length_ratio=5.0"])
    assert folder.config_path.is_file() and cfg.filter.max_length_ratio == 5.0
    _, cfg2 = open_run(run=folder.path, overrides=["filter.max_length_ratio=7.0"])
    assert cfg2.filter.max_length_ratio == 7.0
    assert open_run(run=folder.path)[1].filter.max_length_ratio == 7.0
    with pytest.raises(ConfigError, match="run.name"):
        open_run(run=folder.path, overrides=["run.name=other"])
    assert [r.name for r in list_runs(tmp_path / "runs")] == ["r1"]


def test_pair_source_bypasses_generate_and_label(config):
    with_source = (
        config.model_copy(update={"pair": config.pair.model_copy(update={"source": "x.json"})})
        if "source" in type(config.pair).model_fields
        else None
    )
    names = [s.name for s in active_stages(config)]
    assert names[:5] == ["ingest", "translate", "generate", "label", "pair"]
    if with_source is not None:
        assert "generate" not in [s.name for s in active_stages(with_source)]
        assert resolve_inputs(get_stage("pair"), with_source, {}) == {}
    run = RunFolder.for_config(config)
    assert bypass_stage(get_stage("generate"), run, "pairs given").status == BYPASSED
    assert run.stage_statuses() == {"generate": BYPASSED}


def test_missing_inputs_name_the_stage(config):
    with pytest.raises(ArtifactError, match="stage filter needs pairs"):
        resolve_inputs(get_stage("filter"), config, {})


def test_state_file_is_json_with_invocation(config):
    run = RunFolder.for_config(config)
    run.save_config(config)
    invocation = run.begin_invocation("pipeline", ["ingest", "translate"])
    state = json.loads(Path(run.state_path).read_text())
    assert state["invocation"] == invocation
    assert state["stages"]["ingest"]["status"] == "pending"


def test_plain_outputs_get_a_manifest_downstream_stages_can_read(config):
    run = RunFolder.for_config(config)
    _, translate = _run_both(config, run)
    manifest = read_manifest(translate.outputs["notes"])
    assert manifest.kind == "folder" and manifest.config_hash == translate.identity
    assert manifest.inputs == {"prompts": read_manifest(run.stage_dir("ingest") / "prompts.parquet").content_hash}


def test_stage_folder_linked_outside_the_run_is_refused_before_any_write(config, tmp_path):
    run = RunFolder.for_config(config)
    run.save_config(config)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run.stage_dir("ingest").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ArtifactError, match="symbolic link .* outside the run folder") as err:
        execute_stage(FAKE["ingest"], config, run, {})
    assert str(run.stage_dir("ingest")) in str(err.value)
    assert list(elsewhere.iterdir()) == []  # no artifact, manifest or marker landed outside
    assert run.stage_statuses()["ingest"] == FAILED
    assert "symbolic link" in run.read_state()["stages"]["ingest"]["error"]


def test_link_inside_a_stage_folder_pointing_outside_is_refused(config, tmp_path):
    run = RunFolder.for_config(config)
    _run_both(config, run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run.stage_dir("translate") / "notes").rename(run.stage_dir("translate") / "notes-old")
    (run.stage_dir("translate") / "notes").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ArtifactError, match="notes is a symbolic link"):
        execute_stage(FAKE["translate"], config, run, run.available_outputs(), force=True)
    assert list(elsewhere.iterdir()) == []
    assert run.stage_statuses()["translate"] == FAILED


def test_a_stage_that_fails_after_its_function_returned_is_failed_not_running(config, monkeypatch):
    from mpo_core.plumbing import runs

    def broken_manifests(*args, **kwargs):
        raise ValueError("manifest write failed")

    monkeypatch.setattr(runs, "_manifest_plain_outputs", broken_manifests)
    run = RunFolder.for_config(config)
    with pytest.raises(ValueError, match="manifest write failed"):
        execute_stage(FAKE["ingest"], config, run, {})
    assert run.stage_statuses()["ingest"] == FAILED


def test_a_run_folder_this_machine_cannot_see_names_it_and_the_shared_root_contract(tmp_path):
    """A worker without the shared run root gets the folder, the host and the contract, not a traceback."""
    missing = tmp_path / "not-mounted" / "runs" / "r1"
    with pytest.raises(RunFolderNotVisible) as err:
        open_run(run=missing)
    message = str(err.value)
    assert str(missing) in message and socket.gethostname() in message
    assert "does not exist on this machine" in message and "same absolute path" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.yaml") as err:
        open_run(run=tmp_path / "empty")
    assert not isinstance(err.value, RunFolderNotVisible)


def _calls(run: RunFolder) -> list[dict]:
    path = run.path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fake_any_stage(stage):
    """Records (in ``<run>/calls.jsonl``) what it found in its folder, leaves a file of its own, and writes an
    empty output of every kind the stage table names."""
    calls = stage.out_dir.parent / "calls.jsonl"
    call = {"stage": stage.spec.name, "found": sorted(p.name for p in stage.out_dir.iterdir()), "resume": stage.resume}
    with open(calls, "a") as fh:
        fh.write(json.dumps(call) + "\n")
    (stage.out_dir / f"leftover-{len(calls.read_text().splitlines())}").write_text("x")
    returned = {}
    for output in stage.spec.produces:
        if output.is_table:
            returned[output.name] = Artifact(SCHEMAS[output.kind].empty_table())
        elif output.kind == "folder":
            stage.path(output.name).mkdir(parents=True)
            (stage.path(output.name) / "weights.bin").write_bytes(b"w")
        else:
            stage.path(output.name).parent.mkdir(parents=True, exist_ok=True)
            stage.path(output.name).write_text("report")
    return returned


@pytest.mark.parametrize("name", [spec.name for spec in STAGES])
def test_force_reruns_every_stage_from_an_empty_folder(name, config, tmp_path):
    """``--force`` on any stage calls its function again, in an emptied folder; unforced, it is skipped."""
    spec = dataclasses.replace(get_stage(name), entry="tests.test_runs:fake_any_stage")
    inputs = {}
    for input_name in spec.inputs:
        upstream = artifact_spec(input_name)
        inputs[input_name] = tmp_path / "upstream" / input_name
        if upstream.is_table:
            write_artifact(SCHEMAS[upstream.kind].empty_table(), inputs[input_name], upstream.kind)
        else:
            inputs[input_name].mkdir(parents=True)
    run = RunFolder.for_config(config)
    assert execute_stage(spec, config, run, inputs).status == RAN
    assert execute_stage(spec, config, run, inputs).status == SKIPPED
    forced = execute_stage(spec, config, run, inputs, force=True)
    assert (forced.status, forced.reason) == (RAN, "forced")
    calls = _calls(run)
    assert [c["stage"] for c in calls] == [name, name]
    assert calls[1]["found"] == ["stage.json"] and not calls[1]["resume"], "a forced stage starts empty"
    assert not (run.stage_dir(name) / "leftover-1").exists()
    assert run.read_marker(name)["status"] == "complete"


def test_an_input_edited_by_hand_makes_its_consumer_stale(config):
    """Identities read the inputs themselves, not their manifests: a Parquet input rewritten by hand (its
    manifest not updated) is not silently reused downstream, and ``stale_stages`` (``mpo runs``) says so."""
    import pyarrow.parquet as pq

    run = RunFolder.for_config(config)
    run.save_config(config)
    _run_both(config, run)
    prompts = run.stage_dir("ingest") / "prompts.parquet"
    table = pq.read_table(prompts)
    pq.write_table(table.slice(0, 2), prompts)
    inputs = resolve_inputs(FAKE["translate"], config, run.available_outputs())
    check = check_stage(FAKE["translate"], config, run, inputs)
    assert (check.current, check.reason) == (False, "input prompts changed")
    assert stale_stages(run) == {"ingest": "output prompts changed or incomplete", "translate": "input prompts changed"}
    with pytest.raises(ArtifactError, match="prompts.parquet: content hash does not match its manifest"):
        execute_stage(FAKE["translate"], config, run, inputs)


def fake_notes_reader(stage):
    return {"labelled": Artifact(SCHEMAS["responses"].empty_table(), {"notes": (stage.inputs.path("notes") / "a.txt").read_text()})}


def test_a_checkpoint_folder_edited_by_hand_reruns_its_consumer(config):
    """A folder input (a checkpoint) replaced by hand after its consumer ran: the consumer reruns and reads
    the new content (before, the folder's manifest, written when it was made, stood for its content)."""
    run = RunFolder.for_config(config)
    _, translate = _run_both(config, run)
    consumer = dataclasses.replace(get_stage("label"), inputs=("notes",), entry="tests.test_runs:fake_notes_reader")
    inputs = {"notes": translate.outputs["notes"]}
    assert execute_stage(consumer, config, run, inputs).status == RAN
    assert execute_stage(consumer, config, run, inputs).status == SKIPPED
    (translate.outputs["notes"] / "a.txt").write_text("edited by hand, a longer text")
    rerun = execute_stage(consumer, config, run, inputs)
    assert (rerun.status, rerun.reason) == (RAN, "input notes changed")
    assert read_manifest(rerun.outputs["labelled"]).extra["notes"] == "edited by hand, a longer text"


def test_a_corrupt_marker_is_named_and_does_not_block_a_rerun(config):
    run = RunFolder.for_config(config)
    run.save_config(config)
    _run_both(config, run)
    run.marker_path("translate").write_text("{not json")
    inputs = resolve_inputs(FAKE["translate"], config, run.available_outputs())
    check = check_stage(FAKE["translate"], config, run, inputs)
    assert not check.current and "translate/stage.json: not valid JSON" in check.reason
    assert "stage.json: not valid JSON" in stale_stages(run)["translate"]
    forced = execute_stage(FAKE["translate"], config, run, inputs, force=True)
    assert forced.status == RAN and run.read_marker("translate")["status"] == "complete"
    run.marker_path("translate").write_text("{not json")
    again = execute_stage(FAKE["translate"], config, run, inputs)
    assert again.status == RAN and "marker unreadable" in again.reason


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_damaged_output_is_flagged_without_a_traceback_and_only_its_stage_reruns(config, damage, capsys):
    """An output deleted or truncated after the run: ``stale_stages`` and ``mpo runs`` name it (its stage and
    the consumer that can no longer be checked), nothing raises; the rerun redoes the damaged stage, and its
    consumer, given the same content again, is skipped."""
    from flows.cli import main

    run = RunFolder.for_config(config)
    run.save_config(config)
    _run_both(config, run)
    prompts = run.stage_dir("ingest") / "prompts.parquet"
    if damage == "deleted":
        prompts.unlink()
    else:
        prompts.write_bytes(prompts.read_bytes()[:100])
    stale = stale_stages(run)
    assert stale["ingest"] == ("output prompts missing" if damage == "deleted" else "output prompts changed or incomplete")
    assert stale["translate"] == ("input prompts changed" if damage == "truncated"
                                  else f"input prompts missing ({prompts}): rerun the stage that makes it")
    assert main(["runs", "--root", str(run.path.parent)]) == 0
    out = capsys.readouterr().out
    assert "Traceback" not in out and f"STALE: {stale['ingest']}" in out
    ingest = execute_stage(FAKE["ingest"], config, run, {})
    translate = execute_stage(FAKE["translate"], config, run, resolve_inputs(FAKE["translate"], config, ingest.outputs))
    assert (ingest.status, translate.status) == (RAN, SKIPPED)
    assert stale_stages(run) == {}

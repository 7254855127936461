"""The CLI (parsing, ``mpo runs``), secret redaction, artifact keys and summaries, the accelerate launcher."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import build_parser, main
from mpo_core.plumbing.artifacts import write_artifact
from mpo_core.plumbing.config import config_from_dict
from mpo_core.plumbing.runs import RunFolder
from mpo_core.plumbing.stage_table import get_stage

ROOT = Path(__file__).resolve().parent.parent


def test_import_of_the_cli_is_light():
    code = "import sys, flows.cli; print(any(m in sys.modules for m in ('prefect', 'torch', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_keys_prints_each_key_with_type_default_and_description(capsys):
    """``mpo config keys [SECTION]`` lists the keys (one section, or all) without Prefect or torch."""
    code = ("import sys; from flows.cli import main; main(['config', 'keys', 'train']); "
            "print(any(m in sys.modules for m in ('prefect', 'torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[-1] == "False"
    at = lines.index('train.loss  "mpo" | "dpo" | "simpo" | "ipo" | "sft" = "mpo"')
    assert lines[at + 1].startswith("    Objective: mpo, or a baseline")
    assert "train.trainer_args  dict[str, any] = {}" in lines and "train.lora.r  int = 16" in lines
    assert not any(line.startswith(("run.", "align.")) for line in lines)
    assert main(["config", "keys"]) == 0 and "align.trainer_args  dict[str, any] = {}" in capsys.readouterr().out
    assert main(["config", "keys", "trian"]) == 2
    assert "unknown config section 'trian'; sections: run, model" in capsys.readouterr().err


def test_parser_commands():
    parser = build_parser()
    run = parser.parse_args(["run", "--config", "c.yaml", "--set", "train.beta=1.5", "--set", "run.name=x"])
    assert (run.config, run.set, run.gpu_deployments) == ("c.yaml", ["train.beta=1.5", "run.name=x"], False)
    stage = parser.parse_args(["stage", "filter", "--run", "runs/x", "--set", "filter.max_length_ratio=9.0"])
    assert (stage.name, stage.run, stage.set, stage.force) == (
        "filter",
        "runs/x",
        ["filter.max_length_ratio=9.0"],
        False,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["stage", "filter"])  # --run is required


def test_mpo_runs_lists_stage_states(tmp_path, capsys):
    config = config_from_dict({"run": {"name": "listed", "root": str(tmp_path)}})
    run = RunFolder.for_config(config)
    run.save_config(config)
    run.begin_invocation("pipeline", ["ingest", "filter"])
    run.record("ingest", status="skipped", seconds=0.0)
    run.record("filter", status="ran", seconds=12.5)
    assert main(["runs", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "listed" in out and "ingest     skipped" in out and "filter     ran       12.5 s" in out


def test_mpo_stage_on_a_missing_run_is_a_clean_error(tmp_path, capsys):
    assert main(["stage", "filter", "--run", str(tmp_path / "nope")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_secrets_are_redacted_from_every_log_record(monkeypatch, caplog):
    from tasks.secrets import install_redaction, redact

    token = "hf_abcdefghijklmnopqrstuvwxyz123456"
    monkeypatch.setenv("HF_TOKEN", token)
    install_redaction()
    with caplog.at_level(logging.INFO, logger="transformers.test"):
        logging.getLogger("transformers.test").info("downloading with token %s", token)
    assert token not in caplog.text and "***" in caplog.text
    assert redact(f"Authorization: Bearer {token}") == "Authorization: Bearer ***"


def test_hub_token_from_environment_is_not_looked_up_elsewhere(monkeypatch):
    from tasks.secrets import load_hub_token

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("MPO_HF_TOKEN_BLOCK", raising=False)
    assert load_hub_token() is False
    monkeypatch.setenv("HF_TOKEN", "hf_fromtheenvironment")
    assert load_hub_token() is True


def test_artifact_keys_are_valid_prefect_keys():
    from tasks.stage_task import artifact_key

    assert artifact_key("My_Run.v2", "filter", "progress") == "my-run-v2-filter-progress"


def test_output_summary_links_and_counts_without_data(tmp_path):
    from tasks.stage_task import output_summary

    rows = [
        {
            "prompt_id": f"p{i}",
            "lang": lang,
            "text": f"secret text {i}",
            "category": None,
            "split": "train",
            "source": "t",
            "translated_by": "original",
            "harmful": True,
        }
        for i, lang in enumerate(["en", "en", "zh"])
    ]
    path = tmp_path / "prompts.parquet"
    write_artifact(rows, path, "prompts")
    folder = tmp_path / "model"
    folder.mkdir()
    listing, per_lang = output_summary({"prompts": path, "checkpoint": folder}, tmp_path)
    assert listing[0] == {"output": "prompts", "kind": "prompts", "rows": 3, "path": "prompts.parquet"}
    assert listing[1] == {"output": "checkpoint", "kind": "folder", "path": "model"}
    assert "file://" not in str(listing) and str(tmp_path) not in str(listing)
    assert per_lang == [
        {"output": "prompts", "lang": "en", "rows": 2},
        {"output": "prompts", "lang": "zh", "rows": 1},
    ]
    assert "secret text" not in str(listing) + str(per_lang)


def test_accelerate_launch_command(tmp_path, monkeypatch):
    from mpo_core.plumbing.config import PipelineConfig
    from mpo_core.plumbing.runs import launch_payload, run_in_process
    from mpo_core.plumbing.stage_run import StageInputs, StageRun
    from tasks.launch import launch_command, launcher_for

    spec = get_stage("train")
    stage = StageRun(spec, PipelineConfig(), StageInputs({"filtered": tmp_path / "f.parquet"}), tmp_path / "train",
                     True, "abc", {"filtered": "123"})
    command = launch_command("accelerate launch --multi_gpu --num_processes 8", "train", tmp_path, launch_payload(stage))
    assert command[:6] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "8", "-m"]
    assert command[6:9] == ["mpo_core.plumbing.runs", "train", str(tmp_path.resolve())]
    assert json.loads(command[9]) == {"inputs": {"filtered": str((tmp_path / "f.parquet").resolve())},
                                      "identity": "abc", "input_hashes": {"filtered": "123"}, "resume": True}
    monkeypatch.delenv("MPO_TRAIN_LAUNCHER", raising=False)
    assert launcher_for(spec) is run_in_process
    monkeypatch.setenv("MPO_TRAIN_LAUNCHER", "accelerate launch")
    assert launcher_for(spec) is not run_in_process
    assert launcher_for(get_stage("filter")) is run_in_process


def test_a_stage_in_a_child_process_writes_what_it_writes_in_process(tmp_path, shared_data, monkeypatch):
    """The transfer sweep's lanes run every stage in a child process (``in_child_process``) set for one
    thread (``stages_launched_by``): same outputs as in this process, the override beats the environment and
    stays in its thread."""
    import threading

    from core_pairs import official_pairs, write_pairs

    from mpo_core.plumbing.artifacts import read_artifact
    from mpo_core.plumbing.config import config_from_dict
    from mpo_core.plumbing.runs import RunFolder, run_in_process
    from mpo_core.plumbing.stage_run import run_stage_function
    from tasks.launch import in_child_process, launcher_for, stages_launched_by

    pairs = write_pairs(official_pairs(shared_data, 12, step=7), tmp_path / "pairs.parquet")
    config = config_from_dict({"run": {"root": str(tmp_path / "runs"), "name": "child"},
                               "filter": {"max_length_ratio": 3.0}})
    run = RunFolder.for_config(config)
    run.path.mkdir(parents=True)
    run.save_config(config)
    here = run_stage_function("filter", config, {"pairs": pairs}, tmp_path / "here")
    child = run_stage_function("filter", config, {"pairs": pairs}, run.stage_dir("filter"), in_child_process(1))
    assert child["filtered"].parent == run.stage_dir("filter")
    for name, kind in (("filtered", "pairs"), ("dropped", "dropped")):
        assert read_artifact(child[name], kind).equals(read_artifact(here[name], kind)), name
    assert child["filter_report"].read_text() == here["filter_report"].read_text()

    monkeypatch.setenv("MPO_TRAIN_LAUNCHER", "accelerate launch")
    child_launcher = in_child_process(2)
    seen_elsewhere = []
    with stages_launched_by(child_launcher):
        assert launcher_for(get_stage("train")) is child_launcher is launcher_for(get_stage("filter"))
        other = threading.Thread(target=lambda: seen_elsewhere.append(launcher_for(get_stage("filter"))))
        other.start()
        other.join()
    assert seen_elsewhere == [run_in_process]
    assert launcher_for(get_stage("filter")) is run_in_process
    with pytest.raises(ValueError, match="at least 1"):
        in_child_process(0)


def test_transient_failures_are_retried_but_not_our_own_errors():
    from prefect.states import Failed

    from mpo_core.plumbing.errors import InputDataError
    from tasks.stage_task import is_transient

    assert is_transient(None, None, Failed(data=OSError("disk hiccup"))) is True
    assert is_transient(None, None, Failed(data=InputDataError("bad row 3"))) is False


def test_flow_run_url_names_the_ui_page_or_nothing():
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from tasks.monitoring import flow_run_url

    with temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_UI_URL}):
        assert flow_run_url("abc") is None  # a temporary local server has no page to link to (not "None/...")
    with temporary_settings(updates={PREFECT_API_URL: "http://10.0.0.5:4200/api"}, restore_defaults={PREFECT_UI_URL}):
        assert flow_run_url("abc") == "http://10.0.0.5:4200/runs/flow-run/abc"


def test_mpo_serve_serves_the_run_folder_on_loopback(tmp_path):
    import threading
    import urllib.error
    import urllib.request

    from flows.cli import run_server
    from mpo_core.plumbing.errors import MPOError

    run = tmp_path / "runs" / "served"
    (run / "evaluate" / "report").mkdir(parents=True)
    (run / "config.yaml").write_text("run:\n  name: served\n", encoding="utf-8")
    (run / "evaluate" / "report" / "report.html").write_text("<h1>report</h1>", encoding="utf-8")
    (tmp_path / "outside.txt").write_text("not served", encoding="utf-8")
    with run_server(run, 0) as server:
        host, port = server.server_address[:2]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            base = f"http://{host}:{port}"
            assert host == "127.0.0.1"
            assert urllib.request.urlopen(f"{base}/evaluate/report/report.html").read() == b"<h1>report</h1>"
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(f"{base}/../outside.txt")
        finally:
            server.shutdown()
    with pytest.raises(MPOError, match="not a run folder"):
        run_server(tmp_path, 0)


def test_progress_reporter_shows_each_phase_and_loop_at_once(monkeypatch):
    import tasks.stage_task as stage_module

    shown = []
    monkeypatch.setattr(stage_module, "create_progress_artifact",
                        lambda pct, key, description: shown.append((pct, description)) or "id")
    monkeypatch.setattr(stage_module, "update_progress_artifact",
                        lambda artifact_id, pct, description: shown.append((pct, description)))
    report = stage_module.ProgressReporter("k")
    report("base model: loading model", 0, 0)
    report("base model: generate", 0, 4)
    report("base model: generate", 1, 4)  # within the interval: waits
    report("base model: generate", 4, 4)
    report("trained model: loading model", 0, 0)
    report("trained model: generate", 0, 4)
    assert shown == [
        (0.0, "base model: loading model ..."),
        (0.0, "base model: generate: 0/4"),
        (100.0, "base model: generate: 4/4"),
        (0.0, "trained model: loading model ..."),
        (0.0, "trained model: generate: 0/4"),
    ]

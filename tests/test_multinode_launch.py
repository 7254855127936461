"""Training across nodes: the indexed Kubernetes job's pods (rendered by Prefect's own templating) start node 0
as the flow run and every other node as an agent that joins its launch; a joining agent waits for the payload
of its own flow run. ``tests/test_fsdp_launch.py`` trains with two torchrun nodes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from mpo_core.plumbing.errors import ConfigError, MPOError
from tasks.launch import LAUNCH_FILE, join_training, wait_for_launch

TEMPLATE = Path(__file__).resolve().parents[1] / "deployments" / "train-multinode-kubernetes-job-template.json"


def _pod(variables: dict) -> dict:
    """The pod template of the job the kubernetes worker would create with these job variables."""
    from prefect.utilities.templating import apply_values

    template = json.loads(TEMPLATE.read_text())
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values = {**defaults, "env": {}, "labels": {}, "name": "train", "namespace": "ns", "command": None, **variables}
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == variables.get("nodes", 2)
    return job["spec"]["template"]


def _started_by(pod: dict, index: int, tmp_path: Path) -> list[str]:
    """What pod ``index`` of job ``train-x7k`` executes: its container command run by a real shell, with
    ``prefect`` and ``python`` replaced by scripts that print their arguments and the launcher they got."""
    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    for name in ("prefect", "python"):
        shim = shims / name
        shim.write_text(f'#!/bin/sh\necho "{name} $*"\necho "launcher $MPO_TRAIN_LAUNCHER"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    container = pod["spec"]["containers"][0]
    env = {"PATH": f"{shims}:{os.environ['PATH']}", "HOSTNAME": f"train-x7k-{index}", "JOB_COMPLETION_INDEX": str(index)}
    result = subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def test_pod_zero_runs_the_flow_run_and_the_others_join_it(tmp_path):
    pod = _pod({"image": "mpo:1", "runs_claim": "mpo-runs", "nodes": 3, "gpu_count": 4})
    assert pod["spec"]["subdomain"] == "mpo-train"
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "mpo-runs"
    launcher = "torchrun --nnodes 3 --node-rank {} --nproc-per-node 4 --master-addr train-x7k-0.mpo-train --master-port 29500"
    assert _started_by(pod, 0, tmp_path) == ["prefect flow-run execute", f"launcher {launcher.format(0)}"]
    assert _started_by(pod, 2, tmp_path) == ["python -m tasks.launch join-training", f"launcher {launcher.format(2)}"]


def test_a_joining_node_waits_for_its_own_flow_runs_launch(tmp_path):
    stage_dir = tmp_path / "train"
    stage_dir.mkdir()
    (stage_dir / LAUNCH_FILE).write_text(json.dumps({"flow_run_id": "an-earlier-one", "resume": False}))
    with pytest.raises(MPOError, match=r"no launch of train appeared .* for flow run this-one"):
        wait_for_launch(stage_dir, "this-one", timeout_s=0.3, poll_s=0.05)
    (stage_dir / LAUNCH_FILE).write_text(json.dumps({"flow_run_id": "this-one", "resume": False}))
    assert wait_for_launch(stage_dir, "this-one", timeout_s=0.3, poll_s=0.05) == stage_dir / LAUNCH_FILE


def test_joining_needs_this_nodes_launcher_and_a_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MPO_TRAIN_LAUNCHER", raising=False)
    with pytest.raises(ConfigError, match="MPO_TRAIN_LAUNCHER"):
        join_training(["--run", str(tmp_path)])
    monkeypatch.setenv("MPO_TRAIN_LAUNCHER", "torchrun --nnodes 2 --node-rank 1")
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    with pytest.raises(ConfigError, match="--run or --flow-run-id"):
        join_training([])

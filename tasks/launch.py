"""How a stage function is started: in the task's process, in a child process, or on every GPU through
``accelerate launch``.

Multi-GPU training: set ``MPO_TRAIN_LAUNCHER`` (a job variable of the ``gpu`` pool deployment), e.g.
``accelerate launch --multi_gpu --num_processes 8`` (DDP, or FSDP2 where the recipe sets ``train.sharding:
fsdp2``; ``train.loss: mpo`` refuses FSDP1 and DeepSpeed), or ``torchrun --standalone --nproc_per_node N`` on
CPU machines, where ``accelerate launch`` starts one process.
The train task then runs ``<launcher> -m mpo_core.plumbing.runs train RUN_DIR STAGE_JSON``; every rank runs the
stage function, rank 0 writes the log and the model, and the task checks the outputs and keeps the markers
and the run state.

Across nodes: the task writes the stage's payload to ``<run>/train/.launch.json`` (the run root must be a file
system every node mounts) and starts its launcher as node 0, e.g. ``torchrun --nnodes 2 --node-rank 0
--master-addr HOST --master-port 29500 --nproc-per-node 8``; every other node runs ``python -m tasks.launch
join-training`` with its own ``MPO_TRAIN_LAUNCHER`` (``--node-rank i``), which finds the run from the flow run
(``PREFECT__FLOW_RUN_ID``, as Prefect's workers set it) or ``--run``, waits for that payload and starts the
same command. ``deployments/train-multinode-kubernetes-job-template.json`` does this as an indexed job.

Concurrent pipeline runs in one process (the transfer sweep's lanes) run each stage in a child process of its
own (:func:`in_child_process`, set for the current thread with :func:`stages_launched_by`): torch's thread
count, random state and memory are per process, so runs side by side neither share nor disturb them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from mpo_core.plumbing.artifacts import write_text_atomically
from mpo_core.plumbing.errors import ConfigError, MPOError
from mpo_core.plumbing.runs import Launcher, RunFolder, launch_payload, run_in_process
from mpo_core.plumbing.stage_run import THREAD_ENV, THREADS_OVERRIDE_ENV, StageRun
from mpo_core.plumbing.stage_table import StageSpec
from tasks.processes import run_group

LAUNCHER_ENV = {"train": "MPO_TRAIN_LAUNCHER"}
# the launched stage's payload, in its stage folder, where the agents on other nodes read it
LAUNCH_FILE = ".launch.json"
LAUNCH_TEMP_DIR = ".launch-tmp"

_launcher_override: ContextVar[Launcher | None] = ContextVar("mpo_stage_launcher", default=None)


def launch_command(launcher: str, stage: str, run_dir: Path, payload: str) -> list[str]:
    """The command line that runs ``stage`` of ``run_dir`` under ``launcher`` (``accelerate launch ...``);
    ``payload`` is the ``STAGE_JSON`` argument or ``@FILE``."""
    return [*shlex.split(launcher), "-m", "mpo_core.plumbing.runs", stage, str(run_dir.resolve()), payload]


def launched(launcher: str, env: dict[str, str] | None = None) -> Launcher:
    """A launcher that writes the stage's payload to its ``.launch.json`` (with this flow run's id, so agents
    on other nodes find it), starts the stage under ``launcher`` and waits; rank 0 of the children writes the
    stage's outputs, which the runner then checks. The group never outlives this process
    (:mod:`tasks.processes`): an interrupt stops the ranks too. ``env`` is added to this process's environment
    for the children. The payload file is removed when the launch ends."""

    def run(stage: StageRun) -> None:
        payload_file = stage.out_dir / LAUNCH_FILE
        payload = {**json.loads(launch_payload(stage)), "flow_run_id": _flow_run_id()}
        write_text_atomically(payload_file, json.dumps(payload))
        try:
            command = launch_command(launcher, stage.spec.name, stage.out_dir.parent, f"@{payload_file.resolve()}")
            with launch_temp_dir(stage.out_dir) as temp:
                run_group(command, stdout=sys.stdout, stderr=sys.stderr, env={**os.environ, **(env or {}), **temp})
        finally:
            payload_file.unlink(missing_ok=True)

    return run


def _flow_run_id() -> str | None:
    """The id of the flow run this process runs in (Prefect's runtime, else the worker's environment)."""
    from tasks.monitoring import current_flow_run_id

    found = current_flow_run_id()
    return str(found) if found else os.environ.get("PREFECT__FLOW_RUN_ID")


def run_of_flow_run(flow_run_id: str) -> Path:
    """The run folder a stage flow run works on: its ``run`` parameter, read from the Prefect API."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        parameters = client.read_flow_run(flow_run_id).parameters
    if not parameters.get("run"):
        raise ConfigError(f"flow run {flow_run_id} has no 'run' parameter: start the stage on a run folder")
    return Path(parameters["run"])


def wait_for_launch(stage_dir: Path, flow_run_id: str | None, timeout_s: float, poll_s: float = 1.0) -> Path:
    """The payload file node 0 writes for this launch (for ``flow_run_id`` where given), once it exists."""
    payload_file = stage_dir / LAUNCH_FILE
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if payload_file.is_file():
            written_for = json.loads(payload_file.read_text(encoding="utf-8")).get("flow_run_id")
            if flow_run_id is None or written_for == flow_run_id:
                return payload_file
        time.sleep(poll_s)
    raise MPOError(
        f"no launch of {stage_dir.name} appeared in {payload_file} within {timeout_s:.0f} s"
        + (f" for flow run {flow_run_id}" if flow_run_id else "")
        + ": node 0 runs the stage's flow run and writes it; check that it started and that every node mounts the run root"
    )


@contextlib.contextmanager
def launch_temp_dir(stage_dir: Path) -> Iterator[dict[str, str]]:
    """``{"TMPDIR": <stage_dir>/.launch-tmp}`` for a launcher and its ranks, removed when the launch ends (and
    at the next launch after a kill): torchrun's elastic agent makes a ``torchelastic_*`` folder in the
    temporary folder at every launch and leaves it there."""
    folder = stage_dir / LAUNCH_TEMP_DIR
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield {"TMPDIR": str(folder.resolve())}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def join_training(argv: list[str] | None = None) -> int:
    """``python -m tasks.launch join-training``: this node's agent of a multi-node training launch."""
    parser = argparse.ArgumentParser(prog="python -m tasks.launch join-training", description=join_training.__doc__)
    parser.add_argument("--run", type=Path, help="the run folder (default: the 'run' parameter of the flow run)")
    parser.add_argument("--flow-run-id", default=os.environ.get("PREFECT__FLOW_RUN_ID"),
                        help="the train flow run node 0 runs (default: $PREFECT__FLOW_RUN_ID)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for node 0's launch")
    args = parser.parse_args(argv)
    launcher = os.environ.get(LAUNCHER_ENV["train"], "").strip()
    if not launcher:
        raise ConfigError(f"set {LAUNCHER_ENV['train']} to this node's launcher (torchrun --nnodes N --node-rank i ...)")
    if args.run is None and not args.flow_run_id:
        raise ConfigError("give --run or --flow-run-id (or run under a Prefect worker, which sets PREFECT__FLOW_RUN_ID)")
    run = RunFolder(args.run if args.run is not None else run_of_flow_run(args.flow_run_id))
    payload_file = wait_for_launch(run.stage_dir("train"), args.flow_run_id, args.timeout)
    command = launch_command(launcher, "train", run.path, f"@{payload_file.resolve()}")
    with tempfile.TemporaryDirectory(prefix="mpo-join-") as temp:  # torchrun's folder goes with it
        return subprocess.run(command, stdout=sys.stdout, stderr=sys.stderr, env={**os.environ, "TMPDIR": temp},
                              check=False).returncode


def in_child_process(threads: int) -> Launcher:
    """A launcher that runs the stage function in a new Python process with ``threads`` torch threads."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return launched(shlex.quote(sys.executable), dict.fromkeys((*THREAD_ENV, THREADS_OVERRIDE_ENV), str(threads)))


@contextlib.contextmanager
def stages_launched_by(launcher: Launcher) -> Iterator[None]:
    """Within the block, in this thread (and the Prefect subflows and tasks it runs inline), every stage
    starts under ``launcher``: the stage environment variables do not apply."""
    token = _launcher_override.set(launcher)
    try:
        yield
    finally:
        _launcher_override.reset(token)


def launcher_for(spec: StageSpec) -> Launcher:
    """The launcher set by :func:`stages_launched_by`, else the one named by the stage's environment
    variable (``MPO_TRAIN_LAUNCHER``), else in-process."""
    override = _launcher_override.get()
    if override is not None:
        return override
    launcher = os.environ.get(LAUNCHER_ENV.get(spec.name, ""), "").strip()
    return launched(launcher) if launcher else run_in_process


if __name__ == "__main__":
    if sys.argv[1:2] != ["join-training"]:
        sys.exit("usage: python -m tasks.launch join-training [--run RUN | --flow-run-id ID] [--timeout S]")
    sys.exit(join_training(sys.argv[2:]))

"""How a stage function is started: in the task's process, in a child process, or on every GPU through
``accelerate launch``.

Multi-GPU training: set ``MPO_TRAIN_LAUNCHER`` (a job variable of the ``gpu`` pool deployment), e.g.
``accelerate launch --multi_gpu --num_processes 8`` (DDP, or FSDP2 where the recipe sets ``train.sharding:
fsdp2``; ``train.loss: mpo`` refuses FSDP1 and DeepSpeed), or ``torchrun --standalone --nproc_per_node N`` on
CPU machines, where ``accelerate launch`` starts one process.
The train task then runs ``<launcher> -m mpo_core.plumbing.runs train RUN_DIR STAGE_JSON``; every rank runs the
stage function, rank 0 writes the log and the model, and the task checks the outputs and keeps the markers
and the run state.

Concurrent pipeline runs in one process (the transfer sweep's lanes) run each stage in a child process of its
own (:func:`in_child_process`, set for the current thread with :func:`stages_launched_by`): torch's thread
count, random state and memory are per process, so runs side by side neither share nor disturb them.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextvars import ContextVar

from mpo_core.plumbing.runs import Launcher, launch_payload, run_in_process
from mpo_core.plumbing.stage_run import THREAD_ENV, THREADS_OVERRIDE_ENV, StageRun
from mpo_core.plumbing.stage_table import StageSpec

LAUNCHER_ENV = {"train": "MPO_TRAIN_LAUNCHER"}

_launcher_override: ContextVar[Launcher | None] = ContextVar("mpo_stage_launcher", default=None)


def launch_command(launcher: str, stage: StageRun) -> list[str]:
    """The command line that runs ``stage`` under ``launcher`` (``accelerate launch ...``)."""
    run_dir = stage.out_dir.parent.resolve()
    return [*shlex.split(launcher), "-m", "mpo_core.plumbing.runs", stage.spec.name, str(run_dir), launch_payload(stage)]


def launched(launcher: str, env: dict[str, str] | None = None) -> Launcher:
    """A launcher that starts the stage under ``launcher`` in a child process group and waits; rank 0 of the
    children writes the stage's outputs, which the runner then checks. ``env`` is added to this process's
    environment for the children."""

    def run(stage: StageRun) -> None:
        child_env = {**os.environ, **env} if env else None
        subprocess.run(launch_command(launcher, stage), check=True, stdout=sys.stdout, stderr=sys.stderr,
                       env=child_env)

    return run


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

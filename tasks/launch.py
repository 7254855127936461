"""How a stage function is started: in the task's process, or on every GPU through ``accelerate launch``.

Multi-GPU training: set ``MPO_TRAIN_LAUNCHER`` (a job variable of the ``gpu`` pool deployment), e.g.
``accelerate launch --multi_gpu --num_processes 8`` (DDP, or FSDP2 where the recipe sets ``train.sharding:
fsdp2``; ``train.loss: mpo`` refuses FSDP1 and DeepSpeed), or ``torchrun --standalone --nproc_per_node N`` on
CPU machines, where ``accelerate launch`` starts one process.
The train task then runs ``<launcher> -m mpo_core.plumbing.runs train RUN_DIR STAGE_JSON``; every rank runs the
stage function, rank 0 writes the log and the model, and the task checks the outputs and keeps the markers
and the run state.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from mpo_core.plumbing.runs import Launcher, launch_payload, run_in_process
from mpo_core.plumbing.stage_run import StageRun
from mpo_core.plumbing.stage_table import StageSpec

LAUNCHER_ENV = {"train": "MPO_TRAIN_LAUNCHER"}


def launch_command(launcher: str, stage: StageRun) -> list[str]:
    """The command line that runs ``stage`` under ``launcher`` (``accelerate launch ...``)."""
    run_dir = stage.out_dir.parent.resolve()
    return [*shlex.split(launcher), "-m", "mpo_core.plumbing.runs", stage.spec.name, str(run_dir), launch_payload(stage)]


def launched(launcher: str) -> Launcher:
    """A launcher that starts the stage under ``launcher`` in a child process group and waits; rank 0 of the
    children writes the stage's outputs, which the runner then checks."""

    def run(stage: StageRun) -> None:
        subprocess.run(launch_command(launcher, stage), check=True, stdout=sys.stdout, stderr=sys.stderr)

    return run


def launcher_for(spec: StageSpec) -> Launcher:
    """The launcher named by the stage's environment variable (``MPO_TRAIN_LAUNCHER``), else in-process."""
    launcher = os.environ.get(LAUNCHER_ENV.get(spec.name, ""), "").strip()
    return launched(launcher) if launcher else run_in_process

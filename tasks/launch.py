"""How a stage function is started: in the task's process, or on every GPU through ``accelerate launch``.

Multi-GPU training: set ``MPO_TRAIN_LAUNCHER`` (a job variable of the ``gpu`` pool deployment), e.g.
``accelerate launch --multi_gpu --num_processes 8`` (DDP, or FSDP2 where the recipe sets ``train.sharding:
fsdp2``; ``train.loss: mpo`` refuses FSDP1 and DeepSpeed), or ``torchrun --standalone --nproc_per_node N`` on
CPU machines, where ``accelerate launch`` starts one process.
The train task then runs ``<launcher> -m mpo_core.plumbing.runs train RUN_DIR INPUTS_JSON``; every rank runs the
stage function, rank 0 writes the log and the model and reports the outputs, and the task keeps the markers
and the run state.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.errors import ArtifactError
from mpo_core.plumbing.runs import LAUNCH_OUTPUTS_FILE, StageRunner, run_in_process
from mpo_core.plumbing.stage_table import StageSpec

LAUNCHER_ENV = {"train": "MPO_TRAIN_LAUNCHER"}


def launch_command(launcher: str, spec: StageSpec, run_dir: Path, inputs: dict[str, Path]) -> list[str]:
    """The command line that runs ``spec`` under ``launcher`` (``accelerate launch ...``)."""
    payload = json.dumps({k: str(Path(v).resolve()) for k, v in inputs.items()})
    return [*shlex.split(launcher), "-m", "mpo_core.plumbing.runs", spec.name, str(run_dir.resolve()), payload]


def launched_runner(launcher: str) -> StageRunner:
    """A stage runner that starts the stage under ``launcher`` in a child process group and waits."""

    def run(
        spec: StageSpec, config: PipelineConfig, inputs: dict[str, Path], out_dir: Path
    ) -> dict[str, Path]:
        report = out_dir / LAUNCH_OUTPUTS_FILE
        report.unlink(missing_ok=True)
        command = launch_command(launcher, spec, out_dir.parent, inputs)
        subprocess.run(command, check=True, stdout=sys.stdout, stderr=sys.stderr)
        if not report.exists():
            raise ArtifactError(f"{' '.join(command[:3])} ... finished without writing {report}")
        return {k: Path(v) for k, v in json.loads(report.read_text(encoding="utf-8")).items()}

    return run


def launcher_for(spec: StageSpec) -> StageRunner:
    """``accelerate launch`` for a stage whose launcher env var is set, else in-process."""
    launcher = os.environ.get(LAUNCHER_ENV.get(spec.name, ""), "").strip()
    return launched_runner(launcher) if launcher else run_in_process

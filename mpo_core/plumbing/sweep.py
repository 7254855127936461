"""A sweep of pipeline runs (training loss x target label noise x seed) that share what they have in common.

Every cell of the sweep is an ordinary run of the pipeline, reproducible alone: the recipe plus
``train.loss``, ``train.seed``, ``pair.target_noise`` and ``pair.noise_seed`` (:meth:`Cell.overrides`). The
cells differ only from the pair stage on, so the sweep computes the common stages once and lets the
runner's one reuse rule (:mod:`mpo_core.plumbing.runs`) skip them everywhere else:

1. a ``shared`` run (noise 0) runs every stage before ``train``: ingest, translate, (align), generate,
   label, pair, filter, reference;
2. a ``pairs-noiseNN-sS`` run per noise level and noise seed receives hard-linked copies of the shared
   run's stage folders but pair and filter (:func:`link_stages`, :func:`noise_free_stages`) and runs pair
   and filter only: the reference reads the dominant side alone (``StageSpec.reads_columns``), which label
   noise never touches, so it stays current;
3. each cell run receives hard-linked copies of its pairs run's stage folders, then runs the pipeline:
   every stage before ``train`` is skipped as current, train and evaluate run; a finished cell keeps its
   trained model but not its resume checkpoints (:func:`prune_resume_checkpoints`).

Hard links, not symlinks: a cell's folder is its own (deleting it leaves the others whole), no file is
copied, and a stage that reruns in a cell replaces its files (writes are atomic renames) instead of writing
through into another run. Folder layout of a sweep ``<root>/<name>/``: ``runs/`` (the pipeline runs) and
``transfer/`` (what the benchmark writes).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.runs import RunFolder, active_stages, ensure_inside
from mpo_core.plumbing.stage_table import get_stage

SHARED_RUN = "shared"
FIRST_CELL_STAGE = "train"  # the stages before it are common to cells with the same label noise
NOISE_STAGES = ("pair", "filter")  # what a pairs run computes itself (label noise is a pair setting)
# the transfer benchmark's grid (issue 10): five losses x clean, 20 % and 40 % noisy target labels x two seeds
DEFAULT_METHODS = ["mpo", "dpo", "simpo", "ipo", "sft"]
DEFAULT_NOISE = [0.0, 0.2, 0.4]
DEFAULT_SEEDS = [0, 1]
# Each baseline at the beta its authors and TRL use; MPO keeps the recipe's train.beta (its scale between the
# gaps: the paper's 1.0 for Llama). DPO beta 0.1 (Rafailov et al. 2023, TRL's default), IPO tau 0.1 (TRL's
# default), SimPO beta 2.0 (Meng et al. 2024 use 2.0-2.5) with the recipe's train.simpo_gamma. At MPO's beta 1.0
# DPO's loss on summed log-ratios fell below 1e-6 within 4 steps on the embedded default: it stopped learning.
METHOD_OVERRIDES: dict[str, list[str]] = {
    "dpo": ["train.beta=0.1"],
    "ipo": ["train.beta=0.1"],
    "simpo": ["train.beta=2.0"],
}


@dataclass(frozen=True)
class Cell:
    """One cell: a training loss, a share of target pairs with swapped labels, and a seed (training order
    and, with noise, which pairs are flipped)."""

    method: str
    noise: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-noise{round(self.noise * 100):02d}-s{self.seed}"

    @property
    def pairs_run(self) -> str:
        """The run holding this cell's pairs: the shared run at noise 0, else one per noise level and seed."""
        return SHARED_RUN if self.noise == 0 else f"pairs-noise{round(self.noise * 100):02d}-s{self.seed}"

    def pair_overrides(self) -> list[str]:
        """The label-noise settings; at noise 0 the noise seed keeps its default (no pair is flipped)."""
        out = [f"pair.target_noise={self.noise}"]
        return out + ([f"pair.noise_seed={self.seed}"] if self.noise else [])

    def overrides(self, method_overrides: Mapping[str, list[str]] | None = None) -> list[str]:
        """``key=value`` overrides that turn the sweep's recipe into this cell's run, the method's own last
        (``method_overrides``, default :data:`METHOD_OVERRIDES`)."""
        per_method = METHOD_OVERRIDES if method_overrides is None else method_overrides
        return [f"train.loss={self.method}", f"train.seed={self.seed}", *self.pair_overrides(),
                *per_method.get(self.method, [])]


def sweep_cells(methods: list[str], noise_levels: list[float], seeds: list[int]) -> list[Cell]:
    """Every (method, noise, seed) combination, in that nesting order."""
    return [Cell(m, float(n), s) for m, n, s in product(methods, noise_levels, seeds)]


def split_lanes(cells: list[Cell], workers: int) -> list[list[Cell]]:
    """``cells`` dealt round-robin into at most ``workers`` non-empty lanes (seeds vary fastest in
    :func:`sweep_cells`, so lanes get the same methods and noise levels and so about the same cost)."""
    lanes = [cells[i::workers] for i in range(min(workers, len(cells)))]
    return lanes or [[]]


def runs_root(sweep_dir: str | Path) -> Path:
    """Where a sweep's pipeline runs live (their ``run.root``)."""
    return Path(sweep_dir) / "runs"


def run_overrides(sweep_dir: str | Path, run_name: str) -> list[str]:
    """Overrides that place a run of the sweep: ``run.root`` under the sweep folder, ``run.name``."""
    return [f"run.root={runs_root(sweep_dir)}", f"run.name={run_name}"]


def shared_stages(config: PipelineConfig) -> list[str]:
    """The stages this config runs before ``train``: the ones cells may share."""
    names = [spec.name for spec in active_stages(config)]
    return names[: names.index(FIRST_CELL_STAGE)]


def noise_free_stages(stages: list[str]) -> list[str]:
    """The shared stages a pairs run links from the shared run: all but those label noise changes (its own
    pair and filter are kept when the sweep runs again)."""
    return [stage for stage in stages if stage not in NOISE_STAGES]


def link_stages(source: RunFolder, target: RunFolder, stages: list[str]) -> list[str]:
    """Give ``target`` hard-linked copies of ``source``'s complete stage folders among ``stages``; a folder
    ``target`` already had there is replaced. Returns the stages linked."""
    linked = []
    target.path.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        marker = source.read_marker(stage)
        if not marker or marker.get("status") != "complete":
            continue
        destination = target.stage_dir(stage)
        if destination.exists():
            ensure_inside(destination, target.path, "stage folder")
            shutil.rmtree(destination)
        shutil.copytree(source.stage_dir(stage), destination, copy_function=os.link)
        linked.append(stage)
    return linked


def prune_resume_checkpoints(run: RunFolder) -> int:
    """Delete a finished cell's resume checkpoints (the train stage's ``resume_files``, ``train/checkpoints``:
    optimizer state, 1.6 GB for the embedded model), keeping its trained model; only once the train stage's
    marker is complete. Returns the bytes freed."""
    marker = run.read_marker(FIRST_CELL_STAGE)
    if not marker or marker.get("status") != "complete":
        return 0
    freed = 0
    for name in get_stage(FIRST_CELL_STAGE).resume_files:
        folder = run.stage_dir(FIRST_CELL_STAGE) / name
        if folder.is_dir():
            ensure_inside(folder, run.path, "checkpoint folder")
            freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder)
    return freed


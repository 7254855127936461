"""What training leaves on disk: resume checkpoints (``checkpoints/checkpoint-N``), and the final model folder
(``model/``: safetensors, tokenizer, ``mpo_train.json``, ``log_history.json``) written atomically.

A checkpoint is written into ``checkpoints/.checkpoint-N.tmp/`` and renamed to ``checkpoint-N`` when whole
(:class:`AtomicCheckpoints`), so a process killed while saving leaves at most a temporary folder, which
:func:`latest_checkpoint` removes. When training has finished only the last checkpoint is kept, without its
optimizer state (:func:`keep_final_checkpoint`): for the embedded 135M model a checkpoint is ~1.6 GB while
training (538 MB model + 1.08 GB AdamW state) and ~0.54 GB once finished. That checkpoint rebuilds a lost
``model/`` without retraining (:func:`finished_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpo_core.plumbing.artifacts import atomic_directory, write_bytes_atomically
from mpo_core.plumbing.errors import DiskFullError
from mpo_core.plumbing.stage_table import CHECKPOINT_DIR
from mpo_core.training.sharding import unsharded_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
LOG_HISTORY = "log_history.json"
TRAIN_INFO = "mpo_train.json"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
STAGING_NAME = re.compile(r"^\.checkpoint-(\d+)\.tmp$")
# What a whole checkpoint holds, besides trainer_state.json (written last): the model (full, sharded, LoRA
# adapter or FSDP shards), and, while training is unfinished, the optimizer (file or FSDP shards) and RNG state.
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
               "pytorch_model_fsdp_0")
OPTIMIZER_FILES = ("optimizer.pt", "optimizer_0")
RNG_GLOB = "rng_state*.pth"
# Free space asked for beyond a checkpoint's expected size before it is written.
FREE_SPACE_MARGIN = 1.1


def _has_any(folder: Path, names: tuple[str, ...]) -> bool:
    return any((folder / name).exists() for name in names)


def checkpoint_state(folder: Path) -> dict[str, Any] | None:
    """The ``trainer_state.json`` of a checkpoint folder, or None if it has none or it is unreadable."""
    try:
        return json.loads((Path(folder) / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's trainer state is the end of training (its last step is its ``max_steps``)."""
    return bool(state.get("max_steps")) and state.get("global_step", 0) >= state["max_steps"]


def missing_parts(folder: Path) -> list[str]:
    """What a checkpoint folder lacks to resume from (empty: it is whole). A finished checkpoint needs no
    optimizer or RNG state (:func:`keep_final_checkpoint` drops them)."""
    state = checkpoint_state(folder)
    missing = [] if state is not None else [TRAINER_STATE]
    if not _has_any(folder, MODEL_FILES):
        missing.append("model weights")
    if state is None or not is_finished(state):
        if not _has_any(folder, OPTIMIZER_FILES):
            missing.append("optimizer state")
        if not any(folder.glob(RNG_GLOB)):
            missing.append("RNG state")
    return missing


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest whole ``checkpoint-N`` folder under ``out_dir/checkpoints`` (None if there is none).

    An incomplete checkpoint newer than it (a save killed before this module made saves atomic, or by hand)
    and any ``.checkpoint-N.tmp`` staging folder are named in a warning and removed."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    for staging in sorted(p for p in folder.iterdir() if STAGING_NAME.match(p.name)):
        logger.warning("removing %s: a checkpoint whose save was interrupted", staging)
        shutil.rmtree(staging)
    numbered = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    for _, path in sorted(numbered, reverse=True):
        missing = missing_parts(path)
        if not missing:
            return path
        logger.warning("skipping and removing incomplete checkpoint %s (missing: %s)", path, ", ".join(missing))
        shutil.rmtree(path)
    return None


def finished_checkpoint(out_dir: Path, max_steps: int) -> Path | None:
    """The newest whole checkpoint if it is the end of this training (the model can be rebuilt from it), else
    None. ``max_steps``: the training's step limit (``<= 0``: set by epochs, then any finished checkpoint of
    the same folder is this training's, whose identity empties the folder when it changes)."""
    latest = latest_checkpoint(out_dir)
    state = checkpoint_state(latest) if latest is not None else None
    if state is None or not is_finished(state):
        return None
    return latest if max_steps <= 0 or state["max_steps"] == max_steps else None


def drop_outgrown_checkpoint(out_dir: Path, max_steps: int) -> None:
    """Remove the newest checkpoint where it ended a training of another step limit: a finished checkpoint
    holds no optimizer state, so continuing from it would change the results of a longer training; this one
    then starts from step 0 (``max_steps <= 0``: set by epochs, nothing is dropped)."""
    latest = latest_checkpoint(out_dir)
    state = checkpoint_state(latest) if latest is not None else None
    if state is None or not is_finished(state) or max_steps <= 0 or state["max_steps"] == max_steps:
        return
    logger.warning("%s ended a training of %d steps and holds no optimizer state: this training of %d steps "
                   "starts from step 0 (removed)", latest, state["max_steps"], max_steps)
    shutil.rmtree(latest)


def keep_final_checkpoint(out_dir: Path, trainer_state_json: str) -> Path | None:
    """After training: keep only the newest checkpoint, drop its optimizer state, and store the finished
    trainer state (its log history ends with the train summary) in it. Returns that checkpoint."""
    latest = latest_checkpoint(out_dir)
    if latest is None:
        return None
    for other in (Path(out_dir) / CHECKPOINT_DIR).iterdir():
        if other != latest and CHECKPOINT_NAME.match(other.name):
            shutil.rmtree(other)
    write_bytes_atomically(latest / TRAINER_STATE, trainer_state_json.encode("utf-8"))  # before the optimizer goes
    for name in OPTIMIZER_FILES:
        path = latest / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return latest


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """A :class:`DiskFullError` if the file system of ``folder`` has less than ``needed`` bytes (plus a
    margin) free, before anything is written."""
    free = shutil.disk_usage(folder).free
    if free < needed * FREE_SPACE_MARGIN:
        raise DiskFullError(
            f"{folder}: {free / 1e9:.2f} GB free, {what} needs about {needed / 1e9:.2f} GB "
            f"(+{FREE_SPACE_MARGIN - 1:.0%}): free space there or move run.root"
        )


class AtomicCheckpoints:
    """Mixin for a ``transformers.Trainer`` (first in the bases): each checkpoint is written whole into
    ``.checkpoint-N.tmp/`` and then renamed to ``checkpoint-N`` (one rename), after a free-space check
    against the size of the previous checkpoint (or of the model and its AdamW moments)."""

    _staging: Path | None = None

    def _get_output_dir(self, trial):
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _expected_checkpoint_bytes(self, root: Path) -> int:
        previous = latest_checkpoint(root.parent) if root.is_dir() else None
        if previous is not None and not is_finished(checkpoint_state(previous) or {}):
            return folder_bytes(previous)
        params = [p for p in self.model.parameters()]
        weights = sum(p.numel() * p.element_size() for p in params)
        moments = 2 * sum(p.numel() * 4 for p in params if p.requires_grad)
        return weights + moments

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        root = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = root / f".{name}.tmp"
        if self.args.should_save:
            root.mkdir(parents=True, exist_ok=True)
            check_free_space(root, self._expected_checkpoint_bytes(root), f"checkpoint {root / name}")
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = root / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
            staging.rmdir()
            rotate_checkpoints(output_dir=str(root), save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


def with_atomic_checkpoints(trainer_class: type) -> type:
    """``trainer_class`` with :class:`AtomicCheckpoints` mixed in (for TRL's trainers)."""
    if issubclass(trainer_class, AtomicCheckpoints):
        return trainer_class
    return type(trainer_class.__name__, (AtomicCheckpoints, trainer_class), {})


def save_model_atomically(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    info: dict,
    state_dict=None,
    log_history: list[dict[str, Any]] | None = None,
) -> Path:
    """Save ``model`` (LoRA merged) as safetensors + tokenizer + ``mpo_train.json`` (+ ``log_history.json``,
    the trainer's log history) into ``target``, via a temporary sibling folder renamed into place;
    ``state_dict``: the full weights of a sharded model."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if state_dict is not None:
        model, state_dict = unsharded_model(model, state_dict), None
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAIN_INFO).write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
        if log_history is not None:
            (tmp / LOG_HISTORY).write_text(json.dumps(log_history, indent=1), encoding="utf-8")
    return target


def align_record(checkpoint: str | Path) -> dict[str, Any] | None:
    """What an aligned checkpoint was trained on (its ``mpo_train.json`` ``align`` entry), or None."""
    path = Path(checkpoint) / TRAIN_INFO
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    return info.get("align") and {**info["align"], "global_step": info.get("global_step")}

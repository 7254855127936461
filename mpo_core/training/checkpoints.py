"""What training leaves on disk: resume checkpoints (``checkpoints/checkpoint-N``), and the final model folder
(``model/``: safetensors, tokenizer, ``mpo_train.json``, ``log_history.json``) written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpo_core.plumbing.artifacts import atomic_directory
from mpo_core.plumbing.stage_table import CHECKPOINT_DIR
from mpo_core.training.sharding import unsharded_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


MODEL_DIR = "model"
LOG_HISTORY = "log_history.json"
TRAIN_INFO = "mpo_train.json"


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` folder under ``out_dir/checkpoints`` (None if there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    last = get_last_checkpoint(str(folder))
    return Path(last) if last else None


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

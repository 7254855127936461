"""Resume checkpoints survive interruption: written atomically, incomplete ones skipped (named, removed),
one kept without its optimizer state after training, and a lost final model rebuilt from it, not retrained.
A random-weight model with the real tokenizer keeps these fast."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from core_pairs import write_pairs
from test_training_path import _config, _reference, pairs, tiny_model, tokenizer  # noqa: F401 - fixtures

from mpo_core.plumbing.errors import DiskFullError
from mpo_core.plumbing.stage_run import run_stage_function
from mpo_core.plumbing.stage_table import CHECKPOINT_DIR
from mpo_core.training.checkpoints import LOG_HISTORY, latest_checkpoint, missing_parts


def _train(config, inputs, out_dir: Path) -> Path:
    return run_stage_function("train", config, inputs, out_dir)["checkpoint"]


@pytest.fixture
def setup(pairs, tiny_model, tmp_path):  # noqa: F811 - fixtures
    config = _config(model={"name_or_path": str(tiny_model)}, train={"max_steps": 4, "save_steps": 2})
    inputs = {"filtered": write_pairs(pairs, tmp_path / "pairs.parquet"),
              "reference": _reference(pairs, tmp_path / "reference.parquet", config, 48)}
    return config, inputs


def test_finished_training_keeps_one_checkpoint_without_optimizer_and_rebuilds_a_lost_model(setup, tmp_path, monkeypatch):
    """After training one checkpoint is left (the last), its optimizer state dropped; a deleted
    ``model.safetensors`` is rebuilt from it, byte for byte, with the same log history, without a training step."""
    config, inputs = setup
    model = _train(config, inputs, tmp_path / "train")
    checkpoints = tmp_path / "train" / CHECKPOINT_DIR
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4"]
    assert not (checkpoints / "checkpoint-4" / "optimizer.pt").exists()
    assert missing_parts(checkpoints / "checkpoint-4") == []
    weights = (model / "model.safetensors").read_bytes()
    history = (model / LOG_HISTORY).read_text()

    (model / "model.safetensors").unlink()
    from transformers import Trainer

    def no_training(*args, **kwargs):
        raise AssertionError("retrained instead of rebuilding from the final checkpoint")

    monkeypatch.setattr(Trainer, "train", no_training)
    rebuilt = _train(config, inputs, tmp_path / "train")
    assert (rebuilt / "model.safetensors").read_bytes() == weights
    assert (rebuilt / LOG_HISTORY).read_text() == history
    assert json.loads((rebuilt / "mpo_train.json").read_text())["global_step"] == 4


def test_a_checkpoint_killed_while_saving_is_skipped_named_and_removed(setup, tmp_path, caplog):
    """A staging folder (a save killed mid-way) and a ``checkpoint-N`` with the model but no trainer state,
    optimizer or RNG state (a save killed before saves were atomic): resume takes the newest whole one."""
    config, inputs = setup
    train_dir = tmp_path / "train"
    _train(config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 2})}), inputs, train_dir)
    checkpoints = train_dir / CHECKPOINT_DIR
    whole = checkpoints / "checkpoint-2"
    shutil.rmtree(train_dir / "model")
    # checkpoint-2 is the final one of that 2-step run; give it back its optimizer-era shape: a 4-step run resumes
    state = json.loads((whole / "trainer_state.json").read_text())
    state["max_steps"] = 4
    (whole / "trainer_state.json").write_text(json.dumps(state))
    shutil.copy(whole / "scheduler.pt", whole / "optimizer.pt")  # any file: only its presence is checked here
    broken = checkpoints / "checkpoint-4"
    broken.mkdir()
    shutil.copy(whole / "model.safetensors", broken / "model.safetensors")
    staging = checkpoints / ".checkpoint-3.tmp"
    (staging / "checkpoint-3").mkdir(parents=True)

    with caplog.at_level(logging.WARNING, logger="mpo_core.training.checkpoints"):
        assert latest_checkpoint(train_dir) == whole
    assert not broken.exists() and not staging.exists()
    assert "checkpoint-4" in caplog.text and "trainer_state.json" in caplog.text and "optimizer state" in caplog.text
    assert ".checkpoint-3.tmp" in caplog.text


def test_a_checkpoint_that_would_not_fit_is_refused_before_it_is_written(setup, tmp_path, monkeypatch):
    """Too little free space for the next checkpoint: a DiskFullError naming the folder and the sizes,
    raised before the save starts, and no staging folder left behind."""
    import mpo_core.training.checkpoints as checkpoints_module

    config, inputs = setup
    monkeypatch.setattr(checkpoints_module, "FREE_SPACE_MARGIN", 1e12)
    with pytest.raises(DiskFullError, match=r"GB free, checkpoint .*checkpoint-2 needs about"):
        _train(config, inputs, tmp_path / "train")
    assert not any((tmp_path / "train" / CHECKPOINT_DIR).iterdir())

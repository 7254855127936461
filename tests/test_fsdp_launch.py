"""The train stage under FSDP2 through the launcher users use: ``MPO_TRAIN_LAUNCHER`` makes the train task run
``<launcher> -m mpo_core.plumbing.runs train RUN INPUTS`` (tasks/launch.py; ``accelerate launch --multi_gpu`` on GPUs,
torchrun here). Two CPU processes (gloo) train a tiny random-weight Llama on real pairs with ``train.sharding: fsdp2``, stop at a
sharded checkpoint, then a longer training in the same folder starts over (a finished checkpoint holds no
optimizer state) and saves the full model; one process with the whole batch trains the same
steps. The model really is sharded (every parameter a DTensor, accelerate's FSDP version 2, fp32 master
weights), and losses and final weights equal the one-process run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from core_pairs import official_pairs, write_pairs
from safetensors.torch import load_file

from mpo_core.plumbing.config import config_from_dict
from mpo_core.plumbing.runs import RunFolder
from mpo_core.plumbing.stage_run import run_stage_function
from mpo_core.plumbing.stage_table import CHECKPOINT_DIR, get_stage
from mpo_core.training.checkpoints import LOG_HISTORY, MODEL_DIR, TRAIN_INFO
from tasks.launch import LAUNCH_FILE, launcher_for

WORLD = 2
PAIRS = 4  # two steps of two pairs per epoch
# torchrun of this interpreter: on CPU `accelerate launch` starts one process (its multi-process launcher,
# torchrun underneath, is for GPUs: `--multi_gpu`); every rank then builds the same accelerate state from the
# torchrun environment either way
LAUNCHER = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node {WORLD}"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, default_model_config) -> Path:
    """A 2-layer random-weight Llama with the default model's tokenizer, saved like any local model."""
    from mpo_core.common.models import load_tokenizer
    from mpo_core.method.synthetic import synthetic_causal_lm

    tokenizer = load_tokenizer(default_model_config)
    model = synthetic_causal_lm(vocab_size=len(tokenizer), seed=0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(root: Path, name: str, model: Path, max_steps: int, per_device: int, bf16: bool = False):
    """A tiny run of ``train.sharding: fsdp2``; ``bf16`` also turns on gradient checkpointing, as the paper
    recipes do (FSDP's own activation checkpointing under the launcher)."""
    return config_from_dict(
        {
            "run": {"root": str(root), "name": name},
            "model": {"name_or_path": str(model), "device": "cpu", "dtype": "float32"},
            "reference": {"batch_size": 4, "max_length": 40, "min_safe_share": 0.0},
            "train": {
                "max_length": 40,
                "per_device_batch_size": per_device,
                "learning_rate": 1.0e-3,
                "lr_scheduler": "constant",
                "warmup_ratio": 0.0,
                "max_steps": max_steps,
                "save_steps": 2,
                "sharding": "fsdp2",
                "bf16": bf16,
                "gradient_checkpointing": bf16,
            },
        }
    )


def _prepared_run(config, shared_data: Path, tmp_path: Path) -> tuple[RunFolder, dict[str, Path]]:
    """The run folder of ``config`` with real pairs and their reference built (in this process)."""
    pairs = write_pairs(official_pairs(shared_data, PAIRS, step=11), tmp_path / "pairs.parquet")
    run = RunFolder.for_config(config)
    run.path.mkdir(parents=True)
    reference = run_stage_function("reference", config, {"filtered": pairs}, run.stage_dir("reference"))["reference"]
    return run, {"filtered": pairs, "reference": reference}


def _launch(run: RunFolder, config, inputs: dict[str, Path]) -> dict[str, Path]:
    """The train stage as the train task starts it under ``MPO_TRAIN_LAUNCHER`` (reading the run's config)."""
    run.save_config(config)
    return run_stage_function("train", config, inputs, run.stage_dir("train"), launcher_for(get_stage("train")))


def _logged(train_dir: Path, key: str) -> list[float]:
    history = json.loads((train_dir / MODEL_DIR / LOG_HISTORY).read_text())
    return [entry[key] for entry in history if "loss" in entry]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=torch.float32)
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.slow
def test_accelerate_launched_fsdp2_training_equals_one_process(shared_data, tiny_model, tmp_path, monkeypatch):
    sharded = _config(tmp_path, "sharded", tiny_model, max_steps=2, per_device=2 // WORLD)
    run, inputs = _prepared_run(sharded, shared_data, tmp_path)
    train_dir = run.stage_dir("train")
    monkeypatch.setenv("MPO_TRAIN_LAUNCHER", LAUNCHER)
    agent_folders = set(Path(tempfile.gettempdir()).glob("torchelastic_*"))
    _launch(run, sharded, inputs)
    assert set(Path(tempfile.gettempdir()).glob("torchelastic_*")) == agent_folders  # torchrun's went with the launch
    assert not (train_dir / ".launch-tmp").exists()
    first = train_dir / CHECKPOINT_DIR / "checkpoint-2"
    assert not list(first.glob("*.safetensors")), "resume checkpoints hold shards, not a gathered model"
    assert list(first.rglob("*.distcp")), sorted(p.name for p in first.rglob("*"))
    assert not (first / "optimizer_0").exists(), "a finished training's checkpoint drops its optimizer state"
    # a longer run in the same folder cannot continue without that state: it starts from step 0
    longer = _config(tmp_path, "sharded", tiny_model, max_steps=4, per_device=2 // WORLD)
    outputs = _launch(run, longer, inputs)
    assert outputs["checkpoint"].resolve() == (train_dir / MODEL_DIR).resolve()

    history = json.loads((train_dir / MODEL_DIR / LOG_HISTORY).read_text())
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]
    assert sorted(p.name for p in (train_dir / CHECKPOINT_DIR).iterdir()) == ["checkpoint-4"]
    info = json.loads((train_dir / MODEL_DIR / TRAIN_INFO).read_text())
    assert info["global_step"] == 4
    layout = info["distributed"]
    assert (layout["processes"], layout["fsdp_version"]) == (WORLD, 2), layout
    assert layout["sharded_parameters"] == layout["parameters"] > 0, layout
    assert layout["master_dtype"] == "float32" and layout["checkpointed_layers"] == 0, layout

    _assert_equals_one_process(train_dir, inputs, tiny_model, tmp_path, max_steps=4)


def _assert_equals_one_process(train_dir: Path, inputs: dict[str, Path], tiny_model: Path, tmp_path: Path,
                               max_steps: int) -> None:
    """The launched training in ``train_dir`` equals one process holding the whole batch (losses, gradient
    norms, final weights)."""
    whole_dir = tmp_path / "whole"
    whole = _config(tmp_path, "whole", tiny_model, max_steps=max_steps, per_device=2)
    run_stage_function("train", whole, inputs, whole_dir)
    assert json.loads((whole_dir / MODEL_DIR / TRAIN_INFO).read_text())["distributed"]["processes"] == 1

    # fp32 on both sides; the runs differ only in summation order (each rank pads its own pair, gradients are
    # averaged by a reduce-scatter), so they agree to float32 round-off carried through 4 Adam steps: measured
    # 3e-6 (losses) and 8e-6 (weight updates), bounded here at 1e-4. The gradient norms are compared too,
    # since Adam would hide a gradient scaled by a constant (a sum instead of a mean over the ranks).
    agreement = {}
    for key in ("loss", "grad_norm"):  # both over the whole batch (the per-pair metrics are rank 0's own)
        sharded_values, whole_values = _logged(train_dir, key), _logged(whole_dir, key)
        assert len(sharded_values) == len(whole_values) == max_steps
        assert sharded_values == pytest.approx(whole_values, rel=1e-4, abs=1e-7), key
        agreement[key] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(sharded_values, whole_values))
    base, trained, reference_run = _weights(tiny_model), _weights(train_dir / MODEL_DIR), _weights(whole_dir / MODEL_DIR)
    assert trained.keys() == reference_run.keys() == base.keys()
    differences = {}
    for name, weight in reference_run.items():
        moved = (weight - base[name]).norm()
        assert moved > 0, name
        differences[name] = float((trained[name] - weight).norm() / moved)
    agreement["weights"] = max(differences.values())
    print("largest relative difference to one process:", {k: f"{v:.1e}" for k, v in agreement.items()})
    assert max(differences.values()) < 1e-4, differences


@pytest.mark.slow
def test_two_node_torchrun_training_equals_one_process(shared_data, tiny_model, tmp_path, monkeypatch):
    """Two torchrun agents on 127.0.0.1 as two nodes of one process each (static rendezvous, gloo, FSDP2):
    node 0 is the train task's launch, node 1 joins it with ``python -m tasks.launch join-training``, as the
    other pods of the multi-node Kubernetes job do. The result equals one process with the whole batch."""
    config = _config(tmp_path, "two-nodes", tiny_model, max_steps=2, per_device=1)
    run, inputs = _prepared_run(config, shared_data, tmp_path)
    port = _free_port()
    node = f"{sys.executable} -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --master-addr 127.0.0.1 --master-port {port}"
    joiner = subprocess.Popen(
        [sys.executable, "-m", "tasks.launch", "join-training", "--run", str(run.path), "--timeout", "600"],
        env={**os.environ, "MPO_TRAIN_LAUNCHER": f"{node} --node-rank 1"}, start_new_session=True,
    )
    try:
        monkeypatch.setenv("MPO_TRAIN_LAUNCHER", f"{node} --node-rank 0")
        _launch(run, config, inputs)
        assert joiner.wait(timeout=120) == 0
    finally:
        if joiner.poll() is None:
            os.killpg(joiner.pid, signal.SIGKILL)
            joiner.wait()
    train_dir = run.stage_dir("train")
    layout = json.loads((train_dir / MODEL_DIR / TRAIN_INFO).read_text())["distributed"]
    assert (layout["processes"], layout["fsdp_version"]) == (2, 2), layout
    assert not (train_dir / LAUNCH_FILE).exists(), "the launch's payload file is removed when it ends"
    _assert_equals_one_process(train_dir, inputs, tiny_model, tmp_path, max_steps=2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_launched_fsdp2_bf16_compute_keeps_fp32_master_weights(shared_data, tiny_model, tmp_path, monkeypatch):
    """``train.bf16`` under FSDP2 (with activation checkpointing, as the paper recipes): parameters gathered
    and computed in bf16, gradients reduce-scattered in fp32 into fp32 master shards; the saved model is
    float32 and moved, the losses finite."""
    config = _config(tmp_path, "bf16", tiny_model, max_steps=2, per_device=1, bf16=True)
    run, inputs = _prepared_run(config, shared_data, tmp_path)
    monkeypatch.setenv("MPO_TRAIN_LAUNCHER", LAUNCHER)
    _launch(run, config, inputs)
    train_dir = run.stage_dir("train")

    layout = json.loads((train_dir / MODEL_DIR / TRAIN_INFO).read_text())["distributed"]
    assert layout["sharded_parameters"] == layout["parameters"] > 0, layout
    assert (layout["master_dtype"], layout["compute_dtype"], layout["reduce_dtype"]) == (
        "float32", "bfloat16", "float32",
    ), layout
    assert layout["checkpointed_layers"] == 2, layout  # both decoder layers
    assert all(torch.isfinite(torch.tensor(loss)) for loss in _logged(train_dir, "loss"))
    saved = load_file(str(train_dir / MODEL_DIR / "model.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert all((saved[name] - base[name]).abs().max() > 0 for name in base)


def test_fsdp2_arguments_are_not_the_deprecated_form(tmp_path, monkeypatch, capfd, caplog):
    """``fsdp=True`` plus ``fsdp_config`` (transformers 5.19 warns that ``fsdp="full_shard"`` goes in 5.20):
    TrainingArguments' own translation turns them into accelerate's FSDP2 plugin arguments, without the
    deprecation warning that the string form gives."""
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from mpo_core.training.sharding import sharding_arguments

    def plugin_arguments(sharding: dict) -> tuple[dict, str]:
        """accelerate's plugin arguments and what transformers logged (to stderr, or to pytest's log capture
        once an earlier test has made its logger propagate)."""
        caplog.clear()
        args = SimpleNamespace(**sharding, _apply_legacy_fsdp_to_config=TrainingArguments._apply_legacy_fsdp_to_config)
        return TrainingArguments._process_fsdp_args(args), capfd.readouterr().err + caplog.text

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # restored: the translation sets it
    train = _config(tmp_path, "args", tmp_path, max_steps=1, per_device=1).train
    monkeypatch.setenv("WORLD_SIZE", str(WORLD))
    sharding = sharding_arguments(train)
    assert sharding["fsdp"] is True
    plugin, logged = plugin_arguments(sharding)
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True, plugin
    assert plugin["state_dict_type"] == "SHARDED_STATE_DICT", plugin
    assert "deprecated" not in logged
    assert "deprecated" in plugin_arguments({**sharding, "fsdp": "full_shard"})[1]
    lora = train.model_copy(update={"lora": {"r": 4}})
    assert sharding_arguments(lora) == {}, "LoRA adapters train data-parallel"

"""The train stage on real MPO pairs and the real default model: equivalence with the paper's online
reference, L1 going down, resume, LoRA, baselines, safe checkpoints, and the YAML recipes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from core_pairs import official_pairs, write_pairs
from reference_losses import dpo_sigmoid_loss, ipo_loss

from mpo_core.method.objective import mpo_backward_step, mpo_step_loss, paper_mpo_loss, side
from mpo_core.method.reference import reference_outputs
from mpo_core.plumbing.config import CONFIGS_DIR, config_from_dict, load_config
from mpo_core.plumbing.stage_run import run_stage_function
from mpo_core.training.checkpoints import LOG_HISTORY, MODEL_DIR
from mpo_core.training.examples import MPOCollator, build_examples
from mpo_core.training.fit import build_trainer

ALLOWED_MODEL_FILES = {".safetensors", ".json", ".jinja", ".txt", ".model"}


def _config(tmp: Path, **train) -> object:
    return config_from_dict(
        {
            "model": {"device": "cpu", "dtype": "float32"},
            "reference": {"batch_size": 4, "max_length": 40, "min_safe_share": 0.0},  # the raw model is unsafe
            "train": {
                "max_length": 40,
                "per_device_batch_size": 2,
                "learning_rate": 2.0e-5,
                "lr_scheduler": "constant",
                "warmup_ratio": 0.0,
                "save_steps": 1,
                **train,
            },
        }
    )


@pytest.fixture(scope="module")
def real_pairs(shared_data, tmp_path_factory) -> Path:
    return write_pairs(
        official_pairs(shared_data, 2, step=11), tmp_path_factory.mktemp("train") / "pairs.parquet"
    )


@pytest.fixture(scope="module")
def reference_path(real_pairs, tmp_path_factory) -> Path:
    config = _config(tmp_path_factory.getbasetemp())
    return run_stage_function("reference", config, {"filtered": real_pairs}, tmp_path_factory.mktemp("reference"))["reference"]


def test_every_recipe_validates():
    recipes = sorted(CONFIGS_DIR.glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"default", "llama3.1-8b", "gemma2-9b", "qwen2.5-7b"}
    for path in recipes:
        load_config(path)
    paper = {"llama3.1-8b": (1.0, 6e-7), "gemma2-9b": (1.5, 4e-7), "qwen2.5-7b": (1.5, 6e-7)}
    for name, (beta, lr) in paper.items():
        cfg = load_config(CONFIGS_DIR / f"{name}.yaml")
        assert (cfg.train.beta, cfg.train.learning_rate, cfg.train.num_epochs) == (beta, lr, 2.0)
        assert (cfg.train.lr_scheduler, cfg.train.warmup_ratio, cfg.train.per_device_batch_size) == (
            "cosine",
            0.1,
            1,
        )
        assert cfg.train.bf16 and cfg.train.max_length == 1024 and cfg.model.device == "cuda"
    qwen = load_config(CONFIGS_DIR / "qwen2.5-7b.yaml").run
    assert qwen.dominant_lang == "zh" and qwen.target_langs == ["en", "ja", "ko", "ar", "bn", "sw"]


@pytest.mark.slow
def test_precomputed_reference_equals_online_reference(shared_data, default_model_config):
    """The paper's code runs the reference inside every step with full logits and one backward; ours reads
    RG^d and pooled states computed beforehand, uses the chunked LM head on the target side only and two
    backward passes. Same loss and gradients (float64, so only the maths is compared)."""
    from mpo_core.common.models import load_model, load_tokenizer

    tok = load_tokenizer(default_model_config)
    reference = load_model(default_model_config).eval()
    # the real weights, cut to their first 4 of 30 layers: float64 on a shared 2-core CPU stays quick
    reference.model.layers = reference.model.layers[:4]
    reference.config.num_hidden_layers = 4
    reference = reference.double()
    policy = copy.deepcopy(reference)
    torch.manual_seed(0)
    with torch.no_grad():  # policy != reference so that L2 and its gradient are not zero
        weight = policy.model.layers[2].mlp.up_proj.weight
        weight.add_(1e-3 * torch.randn_like(weight))
    pairs = official_pairs(shared_data, 2, step=13)
    batch = MPOCollator(tok.pad_token_id)(build_examples(tok, pairs, None, 32))
    beta = 1.5

    with torch.no_grad():
        ref_out = reference_outputs(reference, side(batch, "dominant"))
    batch["ref_gap"], batch["ref_pooled"] = ref_out["reward_gap"], ref_out["pooled"]
    loss_pre, metrics_pre, _ = mpo_backward_step(policy, batch, beta, 1.0)
    grads_pre = [p.grad for p in policy.parameters()]
    single_graph_loss, _, _ = mpo_step_loss(policy, batch, beta, 1.0)

    loss_online, metrics_online = paper_mpo_loss(policy, reference, batch, beta)
    grads_online = torch.autograd.grad(loss_online, list(policy.parameters()))

    assert metrics_pre["l2"].item() > 0
    torch.testing.assert_close(loss_pre, loss_online.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single_graph_loss.detach(), loss_online.detach(), atol=1e-5, rtol=1e-5)
    for key in ("l1", "l2"):
        torch.testing.assert_close(metrics_pre[key], metrics_online[key], atol=1e-5, rtol=1e-5)
    for ours, paper in zip(grads_pre, grads_online):
        torch.testing.assert_close(ours, paper, atol=1e-5, rtol=1e-5)


def _log_history(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / MODEL_DIR / LOG_HISTORY).read_text())


def _log_steps(out_dir: Path) -> list[int]:
    return [entry["step"] for entry in _log_history(out_dir) if "loss" in entry]


@pytest.mark.slow
def test_training_reduces_l1_resumes_and_saves_safely(
    real_pairs, reference_path, tmp_path, default_model_config
):
    from mpo_core.common.models import load_model, load_tokenizer
    from mpo_core.plumbing.artifacts import read_artifact

    inputs = {"filtered": real_pairs, "reference": reference_path}
    out = run_stage_function("train", _config(tmp_path, max_steps=2), inputs, tmp_path)["checkpoint"]
    assert _log_steps(tmp_path) == [1, 2]
    # a longer run in the same folder starts from step 0: the finished checkpoint-2 holds no optimizer state
    out = run_stage_function("train", _config(tmp_path, max_steps=4), inputs, tmp_path)["checkpoint"]
    assert _log_steps(tmp_path) == [1, 2, 3, 4]
    assert json.loads((out / "mpo_train.json").read_text())["global_step"] == 4

    assert out == tmp_path / "model"
    assert {p.suffix for p in out.iterdir()} <= ALLOWED_MODEL_FILES
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    for ckpt in (tmp_path / "checkpoints").iterdir():
        assert not list(ckpt.glob("*.bin")), "no pickled training_args in checkpoints"

    tok = load_tokenizer(default_model_config)
    pairs = read_artifact(real_pairs, "pairs")
    reference = read_artifact(reference_path, "reference")
    batch = MPOCollator(tok.pad_token_id)(build_examples(tok, pairs, reference, 40))
    with torch.no_grad():
        _, before, _ = mpo_step_loss(load_model(default_model_config).eval(), batch, 1.0, 1.0)
        trained = load_model(default_model_config.model_copy(update={"name_or_path": str(out)})).eval()
        _, after, _ = mpo_step_loss(trained, batch, 1.0, 1.0)
    assert after["l1"] < 0.7 * before["l1"], (before, after)
    ref_scale = batch["ref_pooled"].square().mean()
    assert after["l2"] < 1e-3 * ref_scale, (after["l2"], ref_scale)


@pytest.mark.slow
def test_gradient_accumulation_gives_the_whole_batch_gradient(
    real_pairs, reference_path, tmp_path, default_model_config
):
    """One batch of 2 pairs, and 2 accumulated micro-batches of 1 pair, reach the optimizer step with the
    same gradient (the same 2 pairs: the sampler's order does not depend on the batch size)."""
    from transformers import TrainerCallback

    from mpo_core.common.models import load_model, load_tokenizer
    from mpo_core.plumbing.artifacts import read_artifact

    tok = load_tokenizer(default_model_config, padding_side="right")
    pairs, reference = read_artifact(real_pairs, "pairs"), read_artifact(reference_path, "reference")
    grads: dict[str, dict[str, torch.Tensor]] = {}

    class GradientAtOptimizerStep(TrainerCallback):
        def __init__(self, name: str) -> None:
            self.name = name

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads[self.name] = {k: p.grad.detach().clone() for k, p in model.named_parameters()}

        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = False  # no end-of-training checkpoint: only the gradient matters here

    for name, (batch_size, accumulation) in {"batch": (2, 1), "accumulated": (1, 2)}.items():
        config = _config(
            tmp_path,
            max_steps=1,
            per_device_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            save_steps=100,
        )
        model = load_model(default_model_config)
        trainer = build_trainer(config, model, tok, pairs, reference, tmp_path / name)
        trainer.add_callback(GradientAtOptimizerStep(name))
        trainer.train()
    assert grads["batch"].keys() == grads["accumulated"].keys()
    for key, whole in grads["batch"].items():
        difference = (grads["accumulated"][key] - whole).norm() / whole.norm().clamp_min(1e-12)
        assert difference < 1e-4, (key, float(difference))


@pytest.mark.slow
def test_lora_training_runs_and_merges(real_pairs, reference_path, tmp_path, default_model_config):
    from safetensors.torch import load_file

    from mpo_core.common.models import resolve_model_path

    config = _config(tmp_path, max_steps=1, learning_rate=1.0e-3, lora={"r": 4, "alpha": 8})
    out = run_stage_function("train", config, {"filtered": real_pairs, "reference": reference_path}, tmp_path)["checkpoint"]
    merged = load_file(out / "model.safetensors")
    base = load_file(Path(resolve_model_path(default_model_config.name_or_path)) / "model.safetensors")
    assert not any("lora" in key for key in merged)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[name], base[name]), "the LoRA update is merged into the saved weights"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "sft"])
def test_baselines_run_a_step(loss, shared_data, tmp_path):
    # the real pair with the shortest target prompt in bytes: TRL drops pairs whose prompt alone reaches
    # max_length, and SmolLM's template adds a ~30-token system turn
    candidates = official_pairs(shared_data, 60)
    sizes = [len(p.encode()) for p in candidates.column("target_prompt").to_pylist()]
    one_pair = write_pairs(candidates.slice(sizes.index(min(sizes)), 1), tmp_path / "one.parquet")
    config = _config(tmp_path, loss=loss, max_steps=1, per_device_batch_size=1, max_length=80, beta=0.1)
    out = run_stage_function("train", config, {"filtered": one_pair}, tmp_path / "run")["checkpoint"]
    assert (out / "model.safetensors").exists()
    first = next(entry for entry in _log_history(tmp_path / "run") if "loss" in entry and entry["step"] == 1)
    if loss in ("dpo", "ipo"):  # TRL's loss against the reference formula: at step 1 the policy is the reference
        expected = {"dpo": dpo_sigmoid_loss, "ipo": ipo_loss}[loss](torch.zeros(1), 0.1).item()
        assert first["loss"] == pytest.approx(expected, rel=1e-3)


def test_dpo_precomputes_the_reference_only_when_it_trains_on_every_pair(monkeypatch):
    from mpo_core.plumbing.config import TrainConfig
    from mpo_core.training.fit import _trains_on_every_row

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _trains_on_every_row(TrainConfig(max_steps=-1, num_epochs=1.0), 50)
    assert not _trains_on_every_row(TrainConfig(max_steps=-1, num_epochs=0.5), 50)
    short = TrainConfig(max_steps=8, per_device_batch_size=2)  # the transfer sweep's cells: 16 of about 50
    assert not _trains_on_every_row(short, 50) and _trains_on_every_row(short, 16)
    assert _trains_on_every_row(TrainConfig(max_steps=8, per_device_batch_size=2, gradient_accumulation_steps=4), 50)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert _trains_on_every_row(short, 50)


@pytest.mark.slow
def test_dpo_short_of_an_epoch_has_the_same_reference_per_step(shared_data, tmp_path):
    """One step on one of two pairs: the reference runs per step (not over both pairs first), and at step 1
    the policy is still the reference, so TRL's loss is the formula's at a zero margin."""
    candidates = official_pairs(shared_data, 60)
    sizes = [len(p.encode()) for p in candidates.column("target_prompt").to_pylist()]
    shortest = sorted(range(len(sizes)), key=sizes.__getitem__)[:2]
    two_pairs = write_pairs(candidates.take(shortest), tmp_path / "two.parquet")
    config = _config(tmp_path, loss="dpo", max_steps=1, per_device_batch_size=1, max_length=80, beta=0.1)
    from mpo_core.common.models import load_model, load_tokenizer
    from mpo_core.training.fit import build_trainer

    trainer = build_trainer(config, load_model(config.model), load_tokenizer(config.model),
                            candidates.take(shortest), None, tmp_path / "built")
    assert trainer.ref_model is not None and "ref_chosen_logps" not in trainer.train_dataset.column_names
    del trainer
    run_stage_function("train", config, {"filtered": two_pairs}, tmp_path / "run")
    first = next(entry for entry in _log_history(tmp_path / "run") if "loss" in entry and entry["step"] == 1)
    assert first["loss"] == pytest.approx(dpo_sigmoid_loss(torch.zeros(1), 0.1).item(), rel=1e-3)


def test_pairs_without_reference_rows_are_named(default_model_config):
    from mpo_core.common.models import load_tokenizer
    from mpo_core.plumbing.errors import InputDataError

    tok = load_tokenizer(default_model_config)
    pairs = pa.table(
        {
            **{c: ["x"] for c in ("pair_id", "target_lang", "dominant_prompt", "dominant_chosen")},
            **{c: ["y"] for c in ("dominant_rejected", "target_prompt", "target_chosen", "target_rejected")},
        }
    )
    reference = pa.table(
        {"pair_id": ["other"], "reward_gap": [0.0], "chosen_pooled": [[0.0]], "rejected_pooled": [[0.0]]}
    )
    with pytest.raises(InputDataError, match="row 0.*pair_id.*'x'"):
        build_examples(tok, pairs, reference, 32)


"""Training-path defects an audit found, one test each: a reference built from other sequences than training
uses, precision depending on the launch, nn.DataParallel, and the official encoding of the paper recipes.
A small random-weight model (mpo_core.method.synthetic) with the real tokenizer keeps them fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from core_pairs import official_pairs, write_pairs

from mpo_core.method.reference import check_reference_encoding, encoding_settings
from mpo_core.plumbing.artifacts import write_artifact
from mpo_core.plumbing.config import CONFIGS_DIR, ModelConfig, config_from_dict, load_config
from mpo_core.plumbing.errors import ConfigError
from mpo_core.plumbing.stage_run import run_stage_function

HIDDEN = 64


def _config(**sections) -> object:
    train = {
        "max_length": 48, "per_device_batch_size": 2, "learning_rate": 1e-4, "lr_scheduler": "constant",
        "warmup_ratio": 0.0, "max_steps": 1, "save_steps": 100,
    }
    train.update(sections.pop("train", {}))
    return config_from_dict(
        {
            "model": {"device": "cpu", "dtype": "float32", **sections.pop("model", {})},
            "reference": {"max_length": 48, **sections.pop("reference", {})},
            "train": train,
        }
    )


def _reference_rows(pairs) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "pair_id": pid, "dominant_chosen_avg_logp": -1.0, "dominant_rejected_avg_logp": -2.0, "reward_gap": 1.0,
            "chosen_pooled": torch.randn(HIDDEN, generator=generator).tolist(),
            "rejected_pooled": torch.randn(HIDDEN, generator=generator).tolist(), "model_fingerprint": "synthetic",
        }
        for pid in pairs.column("pair_id").to_pylist()
    ]


@pytest.fixture(scope="module")
def pairs(shared_data):
    return official_pairs(shared_data, 2, step=7)


@pytest.fixture(scope="module")
def tokenizer():
    from mpo_core.common.models import load_tokenizer

    return load_tokenizer(ModelConfig(device="cpu", dtype="float32"), padding_side="right")


def _reference(pairs, path: Path, config, max_length: int) -> Path:
    write_artifact(_reference_rows(pairs), path, "reference", extra=encoding_settings(config, max_length))
    return path


def test_training_refuses_a_reference_built_at_another_max_length(pairs, tmp_path):
    """Reference at 192 tokens, training at 96: the reference's RG^d and pooled states would not be those of
    the trained sequences (L2 at step 0 would not be 0). The train stage refuses before loading a model."""

    config = _config(reference={"max_length": 192}, train={"max_length": 96})
    pairs_path = write_pairs(pairs, tmp_path / "pairs.parquet")
    reference = _reference(pairs, tmp_path / "reference.parquet", config, 192)
    with pytest.raises(ConfigError, match=r"reference.max_length=192 but training would use train.max_length=96"):
        run_stage_function("train", config, {"filtered": pairs_path, "reference": reference}, tmp_path / "train")
    assert not (tmp_path / "train" / "model").exists()
    check_reference_encoding(reference, _config(train={"max_length": 192}))  # the same sequences: accepted
    other = _config(train={"max_length": 192}, model={"truncation": "llama_factory"})
    with pytest.raises(ConfigError, match="model.truncation"):
        check_reference_encoding(reference, other)


def _trainer(tokenizer, pairs, tmp_path, **train):
    from mpo_core.method.synthetic import synthetic_causal_lm
    from mpo_core.training.fit import build_trainer

    config = _config(train=train)
    model = synthetic_causal_lm(vocab_size=len(tokenizer), hidden_size=HIDDEN)
    reference = _reference(pairs, tmp_path / "reference.parquet", config, 48)
    from mpo_core.plumbing.artifacts import read_artifact

    return build_trainer(config, model, tokenizer, pairs, read_artifact(reference, "reference"), tmp_path)


def test_bf16_applies_on_one_device_with_fp32_weights(tokenizer, pairs, tmp_path):
    """``train.bf16`` with fp32 weights on one device: the MPO step (which calls the backbone and the LM head
    directly, not the model's autocast-wrapped forward) computes in bf16, as it does under DDP."""
    trainer = _trainer(tokenizer, pairs, tmp_path, bf16=True)
    seen: list[torch.dtype] = []
    layer = trainer.model.model.layers[0].mlp.down_proj
    hook = layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    trainer.train()
    hook.remove()
    assert layer.weight.dtype == torch.float32
    assert seen and set(seen) == {torch.bfloat16}, seen


def test_several_gpus_without_a_launcher_are_refused(tokenizer, pairs, tmp_path, monkeypatch):
    """One process seeing several GPUs would make the Trainer wrap the model in nn.DataParallel, which the
    MPO step does not go through: refused with the way to launch instead."""
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ConfigError, match="nn.DataParallel.*accelerate launch"):
        _trainer(tokenizer, pairs, tmp_path)


LLAMA_FACTORY_LLAMA3 = (  # the official code's rendering of one user turn (LLaMA-Factory's llama3 template)
    "{bos}<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_paper_recipes_encode_as_the_official_code(tokenizer):
    """The Llama-3.1 recipe renders prompts without the system block (knowledge cut-off, today's date) that
    the tokenizer's own template adds, and every paper recipe cuts as LLaMA-Factory does; the alternatives
    are settings (``model.chat_template: null``, ``model.truncation: prompt_left``)."""
    from mpo_core.common.models import load_tokenizer
    from mpo_core.method.encoding import encode_prompt_responses, llama_factory_lengths, render_prompt

    llama = load_config(CONFIGS_DIR / "llama3.1-8b.yaml")
    assert llama.model.chat_template is not None
    tok = load_tokenizer(ModelConfig(device="cpu", chat_template=llama.model.chat_template))
    assert render_prompt(tok, "Hi?") == LLAMA_FACTORY_LLAMA3.format(bos=tok.bos_token, prompt="Hi?")
    for name in ("llama3.1-8b", "gemma2-9b", "qwen2.5-7b"):
        assert load_config(CONFIGS_DIR / f"{name}.yaml").model.truncation == "llama_factory"

    assert llama_factory_lengths(700, 600, 1024) == (552, 472)  # both long: shared in proportion
    assert llama_factory_lengths(300, 900, 1024) == (300, 724)  # short prompt kept whole
    assert llama_factory_lengths(900, 100, 1024) == (900, 100)  # short response: no cut needed
    prompt, answer = "word " * 60, "answer " * 60
    chosen, rejected = encode_prompt_responses(tokenizer, prompt, [answer, "No."], 48, truncation="llama_factory")
    full_prompt = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    assert len(chosen.input_ids) == 48 and chosen.prompt_len == rejected.prompt_len
    assert chosen.input_ids[: chosen.prompt_len] == full_prompt[: chosen.prompt_len]  # cut from the right
    assert rejected.input_ids[rejected.prompt_len :][-1] == tokenizer.eos_token_id


def test_fsdp2_sharding_reaches_the_trainer(tokenizer, pairs, tmp_path, monkeypatch):
    """``train.sharding: fsdp2`` (the paper recipes) asks accelerate for FSDP2 under a launcher with several
    processes; one process trains unsharded, with the same fp32 master weights (the sharded step itself:
    tests/test_sharded.py)."""
    from mpo_core.training.sharding import sharding_arguments

    sharded = _config(train={"sharding": "fsdp2"}).train
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert sharding_arguments(sharded)["fsdp_config"]["version"] == 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert sharding_arguments(sharded) == {}
    from mpo_core.method.synthetic import synthetic_causal_lm
    from mpo_core.training.fit import build_trainer

    config = _config(train={"sharding": "fsdp2"})
    bf16_model = synthetic_causal_lm(vocab_size=len(tokenizer), hidden_size=HIDDEN, dtype=torch.bfloat16)
    from mpo_core.plumbing.artifacts import read_artifact

    reference = read_artifact(_reference(pairs, tmp_path / "reference.parquet", config, 48), "reference")
    trainer = build_trainer(config, bf16_model, tokenizer, pairs, reference, tmp_path)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    for name in ("llama3.1-8b", "gemma2-9b", "qwen2.5-7b"):
        recipe = load_config(CONFIGS_DIR / f"{name}.yaml").train
        assert recipe.sharding == "fsdp2" and recipe.bf16


def test_paper_learning_rate_moves_fp32_master_weights(tokenizer, pairs, tmp_path):
    """A bf16-loaded model trained as the paper recipes train (train.sharding fsdp2, bf16, lr 6e-7): one step
    changes most weight elements, because the master weights are fp32 (in bf16, most AdamW updates of 6e-7
    fall below the weights' resolution and are lost)."""
    from mpo_core.method.synthetic import synthetic_causal_lm
    from mpo_core.plumbing.artifacts import read_artifact
    from mpo_core.training.fit import build_trainer

    config = _config(train={"sharding": "fsdp2", "bf16": True, "learning_rate": 6e-7})
    model = synthetic_causal_lm(vocab_size=len(tokenizer), hidden_size=HIDDEN, dtype=torch.bfloat16)
    before = model.model.layers[0].mlp.up_proj.weight.detach().float().clone()
    reference = read_artifact(_reference(pairs, tmp_path / "reference.parquet", config, 48), "reference")
    trainer = build_trainer(config, model, tokenizer, pairs, reference, tmp_path)
    trainer.train()
    after = trainer.model.model.layers[0].mlp.up_proj.weight.detach()
    assert after.dtype == torch.float32
    assert (after != before).float().mean() > 0.5


def test_trainer_args_reach_the_trainer_and_its_reporters_get_per_language_metrics(tokenizer, pairs, tmp_path):
    """``train.trainer_args`` override mpo's defaults in the built trainer (optimizer, weight decay, gradient
    clipping, reporting); what the trainer logs, per target language included, is what every reporting
    integration receives (TensorBoard's and W&B's callbacks write each number of ``on_log``)."""
    from transformers import TrainerCallback

    trainer = _trainer(tokenizer, pairs, tmp_path, trainer_args={
        "optim": "adafactor", "weight_decay": 0.05, "max_grad_norm": 0.25, "report_to": "none"})
    assert (trainer.args.optim, trainer.args.weight_decay, trainer.args.max_grad_norm) == ("adafactor", 0.05, 0.25)
    assert trainer.args.report_to == [] and trainer.args.seed == 0  # "none": no integration; mpo keeps the seed
    reported: list[dict] = []

    class Reporter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            reported.append(dict(logs))

    trainer.add_callback(Reporter())
    trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == "Adafactor"
    langs = set(pairs.column("target_lang").to_pylist())
    assert len(langs) > 1 and {f"target_gap/{lang}" for lang in langs} <= set(reported[0]), reported[0]


def test_per_language_metrics_reach_tensorboard(tokenizer, pairs, tmp_path):
    """``report_to: [tensorboard]`` writes the per-language gaps as TensorBoard scalars (where tensorboard is
    installed; it is not a dependency of mpo)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(tokenizer, pairs, tmp_path, trainer_args={"report_to": ["tensorboard"]})
    trainer.train()
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent)).Reload()
    langs = set(pairs.column("target_lang").to_pylist())
    assert {f"train/target_gap/{lang}" for lang in langs} <= set(events.Tags()["scalars"])


def test_every_argument_mpo_sets_from_its_keys_is_refused_in_trainer_args(tmp_path, monkeypatch):
    """What mpo's keys set (:func:`_common_arguments`, sharding included) cannot also be set through
    ``trainer_args``; only mpo's plain defaults can be overridden there."""
    from mpo_core.plumbing.trainer_arguments import OWNED_ARGUMENTS
    from mpo_core.training.fit import _common_arguments

    monkeypatch.setenv("WORLD_SIZE", "4")
    arguments = _common_arguments(_config(train={"sharding": "fsdp2"}).train, tmp_path, True, 0)
    assert set(arguments) - OWNED_ARGUMENTS == {"report_to", "disable_tqdm", "dataloader_num_workers"}


@pytest.fixture(scope="module")
def tiny_model(tokenizer, tmp_path_factory) -> Path:
    """A random-weight model of hidden size :data:`HIDDEN` with the real tokenizer, saved like any local model."""
    from mpo_core.method.synthetic import synthetic_causal_lm

    folder = tmp_path_factory.mktemp("tiny-model")
    synthetic_causal_lm(vocab_size=len(tokenizer), hidden_size=HIDDEN).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_interrupted_training_resumes_with_each_logged_step_once(pairs, tiny_model, tmp_path, monkeypatch):
    """Training killed after step 3 was logged but before it was saved resumes from checkpoint-2: the log
    history saved beside the model is the trainer's own, restored from the checkpoint (a probe written into
    checkpoint-2 survives), so step 3 appears once, not twice, and no step is missing."""
    import json

    from transformers import TrainerCallback

    import mpo_core.training.fit as fit_module
    from mpo_core.plumbing.stage_table import CHECKPOINT_DIR
    from mpo_core.training.checkpoints import LOG_HISTORY

    class Interrupt(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("interrupted after logging step 3")

    config = _config(model={"name_or_path": str(tiny_model)}, train={"max_steps": 4, "save_steps": 1})
    inputs = {"filtered": write_pairs(pairs, tmp_path / "pairs.parquet"),
              "reference": _reference(pairs, tmp_path / "reference.parquet", config, 48)}
    callbacks = fit_module.trainer_callbacks
    monkeypatch.setattr(fit_module, "trainer_callbacks", lambda: [*callbacks(), Interrupt()])
    with pytest.raises(RuntimeError, match="interrupted after logging step 3"):
        run_stage_function("train", config, inputs, tmp_path / "train")
    checkpoints = tmp_path / "train" / CHECKPOINT_DIR
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    state_file = checkpoints / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"].insert(0, {"step": 0, "probe": "checkpoint-2"})
    state_file.write_text(json.dumps(state))

    monkeypatch.setattr(fit_module, "trainer_callbacks", callbacks)
    model = run_stage_function("train", config, inputs, tmp_path / "train")["checkpoint"]
    history = json.loads((model / LOG_HISTORY).read_text())
    assert history[0] == {"step": 0, "probe": "checkpoint-2"}, "training restarted instead of resuming"
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]
    assert "train_runtime" in history[-1] and sum("train_runtime" in entry for entry in history) == 1
    langs = set(pairs.column("target_lang").to_pylist())
    assert all(f"target_gap/{lang}" in history[1] for lang in langs), history[1]

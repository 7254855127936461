from pathlib import Path

import pytest

from mpo_core.plumbing.config import load_config, section_hash
from mpo_core.plumbing.errors import ConfigError


def test_default_recipe_loads():
    cfg = load_config()
    assert cfg.model.trust_remote_code is False
    assert cfg.run.dominant_lang == "en"


def test_unknown_key_is_an_error(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  betta: 1.0\n")
    with pytest.raises(ConfigError, match=r"train\.betta"):
        load_config(p)


def test_wrong_type_is_an_error(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  beta: 'high'\n")
    with pytest.raises(ConfigError, match=r"train\.beta"):
        load_config(p)


def test_override_changes_only_its_section_hash():
    a = load_config()
    b = load_config(overrides=["filter.max_length_ratio=5.0"])
    assert section_hash(a, "filter") != section_hash(b, "filter")
    assert section_hash(a, "train", "model") == section_hash(b, "train", "model")


def test_seed_is_part_of_training_and_evaluation_identity_but_run_location_is_not():
    from mpo_core.plumbing.stage_table import STAGES, stage_identity

    base = load_config()
    reseeded = load_config(overrides=["run.seed=7"])
    moved = load_config(overrides=["run.name=elsewhere", "run.root=/tmp/other-runs"])
    for spec in STAGES:
        assert stage_identity(spec, base, {}) == stage_identity(spec, moved, {}), spec.name
    changed = {s.name for s in STAGES if stage_identity(s, base, {}) != stage_identity(s, reseeded, {})}
    assert {"train", "evaluate"} <= changed


def test_trainer_args_pass_through_and_are_part_of_the_train_identity():
    plain = load_config()
    args = "{weight_decay: 0.1, optim: adafactor, max_grad_norm: 0.5, report_to: [tensorboard]}"
    tuned = load_config(overrides=[f"train.trainer_args={args}"])
    assert tuned.train.trainer_args == {"weight_decay": 0.1, "optim": "adafactor", "max_grad_norm": 0.5,
                                        "report_to": ["tensorboard"]}
    assert section_hash(plain, "train") != section_hash(tuned, "train")
    assert section_hash(plain, "align") == section_hash(tuned, "align")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.trainer_args={wieght_decay: 0.1}", r"train\.trainer_args\.wieght_decay: not a field of transformers"),
        ("train.trainer_args={weight_decay: heavy}", r"train\.trainer_args\.weight_decay: Input should be a valid number"),
        ("train.trainer_args={optim: adamw_nope}", r"train\.trainer_args\.optim: .*refuses it: adamw_nope is not"),
        ("train.trainer_args={learning_rate: 0.1}", r"train\.trainer_args\.learning_rate: set by train\.learning_rate"),
        ("train.trainer_args={output_dir: /tmp/x}", r"train\.trainer_args\.output_dir: set by mpo \(the stage's"),
        ("train.trainer_args={seed: 3}", r"train\.trainer_args\.seed: set by mpo \(train\.seed / run\.seed\)"),
        ("train.trainer_args={fsdp_config: {}}", r"train\.trainer_args\.fsdp_config: set by mpo \(train\.sharding\)"),
        ("align.trainer_args={beta: 2.0}", r"align\.trainer_args\.beta: set by align\.beta"),
        ("align.trainer_args={lr_scheduler_type: linear}", r"align\.trainer_args\.lr_scheduler_type: set by the align"),
    ],
)
def test_trainer_args_that_the_trainer_or_mpo_refuses_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_trainer_args_are_checked_against_the_losses_own_arguments():
    dpo = load_config(overrides=["train.loss=dpo", "train.trainer_args={precompute_ref_log_probs: false}"])
    assert dpo.train.trainer_args == {"precompute_ref_log_probs": False}
    with pytest.raises(ConfigError, match=r"train\.trainer_args\.precompute_ref_log_probs: not a field of "
                                          r"transformers\.TrainingArguments \(the arguments of loss 'mpo'\)"):
        load_config(overrides=["train.trainer_args={precompute_ref_log_probs: false}"])

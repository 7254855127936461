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
    one = load_config(overrides=["train.trainer_args.weight_decay=0.01"])  # one field from the command line
    assert one.train.trainer_args == {"weight_decay": 0.01}


def test_checking_trainer_args_sets_up_no_device_state():
    """The check builds the arguments object with its device answered: no accelerate state, no process group
    (a launched training sets those up itself, once)."""
    import subprocess
    import sys

    code = ("from mpo_core.plumbing.config import load_config; import torch.distributed as dist; "
            "from accelerate.state import PartialState; "
            "load_config(overrides=['train.trainer_args={weight_decay: 0.1}', 'train.loss=dpo']); "
            "print(PartialState._shared_state == {}, dist.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


@pytest.mark.parametrize(
    ("section", "args", "message"),
    [
        ("train", "{wieght_decay: 0.1}", r"wieght_decay: not a field of transformers\.TrainingArguments"),
        ("train", "{weight_decay: heavy}", r"weight_decay: Input should be a valid number"),
        ("train", "{optim: adamw_nope}", r"optim: transformers\.TrainingArguments refuses it: adamw_nope is not"),
        ("train", "{learning_rate: 0.1}", r"learning_rate: set by train\.learning_rate, not through"),
        ("train", "{output_dir: /tmp/x}", r"output_dir: set by mpo \(the stage's checkpoints folder\)"),
        ("train", "{seed: 3}", r"seed: set by mpo \(train\.seed / run\.seed\)"),
        ("train", "{fsdp_config: {}}", r"fsdp_config: set by mpo \(train\.sharding\)"),
        ("align", "{beta: 2.0}", r"beta: set by align\.beta"),
        ("align", "{lr_scheduler_type: linear}", r"lr_scheduler_type: set by the align stage itself"),
    ],
)
def test_trainer_args_that_the_trainer_or_mpo_refuses_name_the_key(section, args, message):
    with pytest.raises(ConfigError, match=rf"{section}\.trainer_args\.{message}"):
        load_config(overrides=[f"{section}.trainer_args={args}"])


def test_trainer_args_are_checked_against_the_losses_own_arguments():
    dpo = load_config(overrides=["train.loss=dpo", "train.trainer_args={precompute_ref_log_probs: false}"])
    assert dpo.train.trainer_args == {"precompute_ref_log_probs": False}
    with pytest.raises(ConfigError, match=r"train\.trainer_args\.precompute_ref_log_probs: not a field of "
                                          r"transformers\.TrainingArguments \(the arguments of loss 'mpo'\)"):
        load_config(overrides=["train.trainer_args={precompute_ref_log_probs: false}"])


def test_every_config_key_has_a_description():
    from mpo_core.plumbing.config import Section

    def sections(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from sections(sub)

    missing = [f"{cls.__name__}.{name}" for cls in sections(Section)
               for name, field in cls.model_fields.items()
               if not (field.description or "").strip() or "\n" in field.description]
    assert len(list(sections(Section))) >= 13 and missing == []


def test_config_reference_page_is_up_to_date():
    from mpo_core.plumbing.config_reference import REFERENCE_PAGE, config_keys, reference_page

    assert REFERENCE_PAGE.read_text(encoding="utf-8") == reference_page(), (
        "docs/config.md is stale: run `python -m mpo_core.plumbing.config_reference`")
    keys = {key.key: key for key in config_keys()}
    assert (keys["train.warmup_ratio"].type, keys["train.warmup_ratio"].default) == ("float", "0.1")
    row = f"| `filter.max_length_ratio` | float | `20.0` | {keys['filter.max_length_ratio'].description} |"
    assert row in REFERENCE_PAGE.read_text(encoding="utf-8")

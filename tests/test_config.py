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

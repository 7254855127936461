"""The stage profile (:mod:`mpo_core.plumbing.profile`): exclusive nested phases, work, the file it writes;
``runtime.threads`` applied per stage and kept out of every stage's identity."""

from __future__ import annotations

import time

from mpo_core.plumbing import profile
from mpo_core.plumbing.config import PipelineConfig, section_hash
from mpo_core.plumbing.stage_table import STAGES, stage_identity


def test_nested_phases_are_exclusive_and_the_rest_is_other(tmp_path):
    with profile.profiled("align") as stage:
        with profile.timed("backward"):
            time.sleep(0.05)
            with profile.timed("forward"):
                time.sleep(0.1)
            profile.add_work("forward", 10, profile.forward_flops(5, 10))
        time.sleep(0.05)
    phases = stage.to_dict()["phases"]
    assert 0.09 < phases["forward"]["seconds"] < 0.2
    assert 0.04 < phases["backward"]["seconds"] < 0.09  # the forward inside it is not counted twice
    assert phases["other"]["seconds"] >= 0.04
    assert phases["forward"]["tokens"] == 10 and phases["forward"]["flops"] == 100.0
    path = profile.write_profile(stage, tmp_path)
    assert profile.read_profile(tmp_path)["phases"]["forward"]["calls"] == 1
    assert path.name == profile.PROFILE_FILE and [p.name for p in tmp_path.iterdir()] == [profile.PROFILE_FILE]


def test_generation_forwards_are_prefill_then_decode_and_nothing_leaks_outside_a_profile():
    with profile.generating():
        assert [profile.forward_phase() for _ in range(3)] == ["prefill", "decode", "decode"]
    assert profile.forward_phase() == "forward"
    with profile.timed("io"):  # no active profile: timed, recorded nowhere, no error
        profile.add_work("io", 1, 1.0)
    assert profile.open_phase() is None


def test_runtime_threads_is_no_part_of_any_stage_identity():
    one = PipelineConfig.model_validate({"runtime": {"threads": 1}})
    four = PipelineConfig.model_validate({"runtime": {"threads": 4}})
    assert all(stage_identity(s, one, {}) == stage_identity(s, four, {}) for s in STAGES)
    assert section_hash(one, "run", "model") == section_hash(four, "run", "model")


def test_runtime_threads_set_torch_and_the_thread_environment_and_a_launchers_count_wins(monkeypatch):
    import os

    import torch

    from mpo_core.plumbing.stage_run import THREAD_ENV, THREADS_OVERRIDE_ENV, apply_threads

    before = torch.get_num_threads()
    for name in (*THREAD_ENV, THREADS_OVERRIDE_ENV):
        monkeypatch.delenv(name, raising=False)
    try:
        apply_threads(2)
        assert torch.get_num_threads() == 2 and all(os.environ[n] == "2" for n in THREAD_ENV)
        apply_threads(0)  # torch's own default: left as it is
        assert torch.get_num_threads() == 2
        monkeypatch.setenv(THREADS_OVERRIDE_ENV, "1")
        apply_threads(2)
        assert torch.get_num_threads() == 1 and all(os.environ[n] == "1" for n in THREAD_ENV)
    finally:
        torch.set_num_threads(before)

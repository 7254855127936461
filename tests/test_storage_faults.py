"""A full disk and a read-only run root are named errors, raised before a stage writes where that can be
known, never retried, and leave no temporary file. Real file systems: a small tmpfs mounted for the test
(needs root; skipped otherwise), remounted read-only."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
from test_runs import FAKE, _prompt_rows

from mpo_core.plumbing.config import config_from_dict
from mpo_core.plumbing.errors import DiskFullError, ReadOnlyRunError, is_transient_error
from mpo_core.plumbing.runs import FAILED, RunFolder, execute_stage, run_lock
from mpo_core.plumbing.stage_run import Artifact
from mpo_core.plumbing.stage_table import get_stage

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


def fake_big_ingest(stage):
    """Prompts whose text is ~7 MB of random hex: more than the test's file system holds."""
    rows = _prompt_rows(6)
    for row in rows:
        row["text"] = os.urandom(600_000).hex()
    return {"prompts": Artifact(rows)}


BIG = dataclasses.replace(get_stage("ingest"), entry="tests.test_storage_faults:fake_big_ingest")


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _config(root: Path, **runtime):
    return config_from_dict({"run": {"name": "r", "root": str(root)}, "runtime": runtime})


def test_a_disk_that_fills_during_a_stage_is_a_named_error_not_retried_and_leaves_no_temp_file(small_disk):
    config = _config(small_disk, min_free_mb=1)
    run = RunFolder.for_config(config)
    with pytest.raises(DiskFullError, match=r"no space left on the device .* free space there or move run.root") as caught:
        execute_stage(BIG, config, run, {})
    assert not is_transient_error(caught.value)
    assert not is_transient_error(OSError(errno.ENOSPC, "No space left on device"))
    assert is_transient_error(ConnectionResetError(errno.ECONNRESET, "reset"))  # a dropped connection still is
    leftovers = [p.name for p in run.stage_dir("ingest").iterdir() if p.name != "stage.json"]
    assert leftovers == [], leftovers
    assert not list(small_disk.rglob("*.tmp"))
    entry = json.loads(run.state_path.read_text())["stages"]["ingest"]
    assert entry["status"] == FAILED and entry["error"].startswith("DiskFullError: ")


def test_too_little_free_space_is_refused_before_the_stage_writes(small_disk):
    config = _config(small_disk, min_free_mb=50)
    run = RunFolder.for_config(config)
    with pytest.raises(DiskFullError, match=r"MB free, runtime.min_free_mb asks for 50 MB"):
        execute_stage(FAKE["ingest"], config, run, {})
    assert not run.path.exists()


def test_a_read_only_run_root_is_named_before_anything_is_written(small_disk):
    config = _config(small_disk, min_free_mb=0)
    run = RunFolder.for_config(config)
    execute_stage(FAKE["ingest"], config, run, {})
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    before = sorted(str(p) for p in small_disk.rglob("*"))
    with pytest.raises(ReadOnlyRunError, match="cannot be written .*give it a writable run.root"):
        execute_stage(FAKE["ingest"], config, run, {}, force=True)
    with pytest.raises(ReadOnlyRunError, match="give it a writable run.root"), run_lock(run.path):
        pass
    assert sorted(str(p) for p in small_disk.rglob("*")) == before

"""One writer per run: ``run.lock`` names its holder; a live holder is a RunLockedError, a dead one's lock is
taken over with a warning naming it; other runs (another run.name) are not affected. Real processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mpo_core.plumbing.errors import RunLockedError
from mpo_core.plumbing.runs import LOCK_FILE, run_lock

HOLD = "import sys, time; from mpo_core.plumbing.runs import run_lock\nwith run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"


def _holder(run_dir) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_live_holder_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    run_dir = tmp_path / "runs" / "a"
    holder = _holder(run_dir)
    try:
        record = json.loads((run_dir / LOCK_FILE).read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname() and record["started_at"]
        with (pytest.raises(RunLockedError, match=rf"pid {holder.pid} on {socket.gethostname()}, started "),
              run_lock(run_dir)):
            pass
        with run_lock(tmp_path / "runs" / "b"):  # another run name runs side by side
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind by the kill
    with caplog.at_level(logging.WARNING, logger="mpo_core.plumbing.runs"), run_lock(run_dir) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with run_lock(run_dir):  # nested in one process: shared
            pass
        assert lock.exists()
    assert f"stale lock of pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert not (run_dir / LOCK_FILE).exists()


def test_two_processes_racing_for_one_run_get_one_lock(tmp_path):
    """Eight processes start at once on one run folder: exactly one holds the lock, the others are refused."""
    run_dir = tmp_path / "run"
    script = ("import sys, time; from mpo_core.plumbing.runs import run_lock\n"
              "try:\n    with run_lock(sys.argv[1]):\n        print('held', flush=True); time.sleep(10)\n"
              "except Exception as err:\n    print(type(err).__name__, flush=True)")
    processes = [subprocess.Popen([sys.executable, "-c", script, str(run_dir)], stdout=subprocess.PIPE, text=True)
                 for _ in range(8)]
    deadline = time.monotonic() + 120
    outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].strip() for p in processes]
    assert sorted(outputs) == ["RunLockedError"] * 7 + ["held"], outputs

"""The fault suite: real ``mpo run`` processes interrupted by real signals, a real Prefect server stopped
under them, two writers on one run, damaged outputs and a read-only run root. Each case asserts a named
error or a recovery, that no process of the run outlives it (its process tree, listed before the fault,
is gone after), that no flow run is left RUNNING, and that the rerun ends with the content hashes of an
undisturbed run. A random-weight model with the real tokenizer and the pair-source path keep each run short.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from mpo_core.plumbing.runs import LOCK_FILE, RunFolder
from tests.integration.conftest import BIN, ROOT, PrefectServer, prefect_env, stop
from tests.integration.test_pipeline_reuse import fast_recipe

pytestmark = pytest.mark.slow

MAX_STEPS, SAVE_STEPS = 8, 2
EXIT_AFTER_SIGNAL_S = 30  # "within seconds": a stage stops at once; the flow run's final state is reported first
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight causal LM (hidden size 64) with the embedded default's tokenizer."""
    from mpo_core.common.models import load_tokenizer
    from mpo_core.method.synthetic import synthetic_causal_lm
    from mpo_core.plumbing.config import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(device="cpu", dtype="float32"), padding_side="right")
    folder = tmp_path_factory.mktemp("tiny-model")
    synthetic_causal_lm(vocab_size=len(tokenizer), hidden_size=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def suite(tmp_path_factory, shared_data, tiny_model):
    """The suite's folder (recipes, runs root, a fresh Prefect home) and a recipe maker."""
    folder = tmp_path_factory.mktemp("faults")

    def recipe(name: str, root: Path | None = None) -> Path:
        path = fast_recipe(folder, shared_data, name, max_steps=MAX_STEPS, save_steps=SAVE_STEPS)
        text = path.read_text(encoding="utf-8").replace(
            "model:\n  dtype: float32", f"model:\n  name_or_path: {tiny_model}\n  dtype: float32")
        if root is not None:
            text = text.replace(f"root: {folder / 'runs'}", f"root: {root}")
        path.write_text(text + "runtime:\n  min_free_mb: 50\n", encoding="utf-8")
        return path

    return folder, recipe


def _env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """A user's environment: no PREFECT_API_URL (mpo starts and owns a temporary server) unless given."""
    return prefect_env(home, api_url)


def start_mpo(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``mpo ARGS`` as a terminal runs it: the leader of its own process group (Ctrl-C reaches the group)."""
    with open(log, "ab") as out:
        return subprocess.Popen([str(BIN / "mpo"), *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def run_mpo(args: list[str], env: dict[str, str], log: Path, timeout_s: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    process = start_mpo(args, env, log)
    try:
        process.wait(timeout=timeout_s)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, log.read_text(encoding="utf-8", errors="replace")


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc), and ``pid`` itself."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo.extend(children.get(current, []))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_no_orphans(tree: set[int], within_s: float = 15.0) -> None:
    """No process of the tree listed before the fault is alive any more (within a few seconds)."""
    deadline = time.monotonic() + within_s
    while (alive := sorted(p for p in tree if _alive(p))) and time.monotonic() < deadline:
        time.sleep(0.3)
    listing = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:200] for p in alive}
    assert not alive, f"processes outlived mpo: {listing}"


def flow_runs_in(home: Path, *states: str) -> list[tuple[str, str]]:
    """(name, state type) of the flow runs in the Prefect database of ``home`` in one of ``states``."""
    with sqlite3.connect(home / "prefect.db") as db:
        rows = db.execute("select name, state_type from flow_run").fetchall()
    return [row for row in rows if row[1] in states]


def wait_for_checkpoint(run_dir: Path, step: int, process: subprocess.Popen, log: Path) -> None:
    checkpoint = run_dir / "train" / "checkpoints" / f"checkpoint-{step}"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not checkpoint.is_dir():
        assert process.poll() is None, f"mpo ended before {checkpoint.name}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {checkpoint.name} in time"
        time.sleep(0.1)


def content_hashes(run_dir: Path) -> dict[str, str]:
    """A hash of every Parquet artifact's rows, with the run folder's own path (the trained model's, in the
    responses' ``model`` column) written as ``<run>``, and the trained weights' sha256 (the report, which
    records the time taken, left out): equal for two runs of one recipe under different names."""
    import pyarrow.parquet as pq

    hashes = {}
    for path in sorted(p for p in run_dir.rglob("*.parquet") if not p.name.startswith(".")):
        rows = json.dumps(pq.read_table(path).to_pylist(), sort_keys=True, default=str)
        hashes[str(path.relative_to(run_dir))] = hashlib.sha256(
            rows.replace(str(run_dir), "<run>").encode("utf-8")).hexdigest()
    hashes["train/model/model.safetensors"] = hashlib.sha256(
        (run_dir / "train" / "model" / "model.safetensors").read_bytes()).hexdigest()
    return hashes


def _stopped_by_signal(process: subprocess.Popen, sent_at: float) -> float:
    process.wait(timeout=EXIT_AFTER_SIGNAL_S + 30)
    return time.monotonic() - sent_at


@pytest.fixture(scope="module")
def undisturbed(suite):
    """A run nothing disturbs, on a bind mount of its root that the read-only case remounts (needs root)."""
    folder, recipe = suite
    real, mount = folder / "ro-real", folder / "ro-root"
    real.mkdir()
    mount.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "--bind", str(real), str(mount)], check=False).returncode == 0
    root = mount if mounted else real
    path = recipe("undisturbed", root)
    home = folder / "home-undisturbed"
    rc, out = run_mpo(["run", "--config", str(path)], _env(home), folder / "undisturbed.log")
    try:
        assert rc == 0, out[-3000:]
        yield root / "undisturbed", path, home, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_finished_run_on_a_read_only_root_writes_nothing_and_a_write_is_named(undisturbed, suite):
    run_dir, path, home, mounted = undisturbed
    if not mounted:
        pytest.skip("remounting the run root read-only needs root")
    folder, _ = suite
    subprocess.run(["mount", "-o", "remount,bind,ro", str(run_dir.parent)], check=True)
    try:
        before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
        rc, out = run_mpo(["run", "--config", str(path)], _env(home), folder / "ro-run.log", 120)
        assert rc == 0 and "Nothing to do" in out and "Traceback" not in out, out[-3000:]
        rc, out = run_mpo(["stage", "filter", "--run", str(run_dir), "--force"], _env(home), folder / "ro-stage.log", 120)
        assert rc == 2 and "read-only" in out and "give it a writable run.root" in out, out[-3000:]
        assert "Traceback" not in out
        assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    finally:
        subprocess.run(["mount", "-o", "remount,bind,rw", str(run_dir.parent)], check=True)


def test_damaged_outputs_are_flagged_and_only_their_stages_redone(undisturbed, suite):
    """A truncated filter output and a deleted final model: ``mpo runs`` flags both (no traceback); the rerun
    redoes filter (same content, so reference is skipped) and rebuilds the model from the final checkpoint
    without a training step; the hashes are the undisturbed ones."""
    run_dir, path, home, _ = undisturbed
    folder, _ = suite
    expected = content_hashes(run_dir)
    filtered = run_dir / "filter" / "filtered.parquet"
    filtered.write_bytes(filtered.read_bytes()[:200])
    (run_dir / "train" / "model" / "model.safetensors").unlink()
    rc, out = run_mpo(["runs", "--root", str(run_dir.parent)], _env(home), folder / "damaged-runs.log", 120)
    assert rc == 0 and "Traceback" not in out, out
    assert "STALE: output filtered changed or incomplete" in out
    flagged = {line.split()[0] for line in out.splitlines() if "STALE:" in line}
    assert {"filter", "reference", "train", "evaluate"} <= flagged, out
    rc, out = run_mpo(["run", "--config", str(path)], _env(home), folder / "damaged-rerun.log")
    assert rc == 0, out[-3000:]
    states = RunFolder(run_dir).stage_statuses()
    assert (states["filter"], states["reference"], states["train"]) == ("ran", "skipped", "ran"), states
    assert "the model is rebuilt from it, not retrained" in out and "train: step" not in out
    assert content_hashes(run_dir) == expected


def test_ctrl_c_sigterm_and_sigkill_each_stop_the_run_and_the_rerun_resumes(undisturbed, suite):
    """One run, three faults during training, each followed by a rerun from the same command: Ctrl-C in the
    terminal (SIGINT to the process group), SIGTERM to mpo, SIGKILL to mpo. A second ``mpo run`` of the same
    run meanwhile is refused, naming the holder. The last rerun finishes with the undisturbed hashes."""
    undisturbed_dir = undisturbed[0]
    folder, recipe = suite
    path, home = recipe("interrupted"), folder / "home-interrupted"
    run_dir = folder / "runs" / "interrupted"
    env = _env(home)
    faults = [(2, "SIGINT to the process group"), (4, "SIGTERM to mpo"), (6, "SIGKILL to mpo")]
    for step, fault in faults:
        log = folder / f"interrupted-{step}.log"
        process = start_mpo(["run", "--config", str(path)], env, log)
        try:
            if step == 2:
                while not (run_dir / LOCK_FILE).is_file():
                    assert process.poll() is None, log.read_text()[-3000:]
                    time.sleep(0.1)
                rc, out = run_mpo(["run", "--config", str(path)], env, folder / "second-writer.log", 120)
                assert rc == 2 and f"being written by another mpo process (pid {process.pid} on" in out, out[-2000:]
            wait_for_checkpoint(run_dir, step, process, log)
            tree = descendants(process.pid)
            assert len(tree) > 1, "mpo started no temporary Prefect server"
            sent = time.monotonic()
            if step == 2:
                os.killpg(process.pid, signal.SIGINT)
            else:
                os.kill(process.pid, signal.SIGTERM if step == 4 else signal.SIGKILL)
            took = _stopped_by_signal(process, sent)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        out = log.read_text(encoding="utf-8", errors="replace")
        print(f"{fault} at checkpoint-{step}: mpo ended {took:.1f} s after it, exit {process.returncode}")
        assert_no_orphans(tree)
        run = RunFolder(run_dir)
        if step != 6:
            assert process.returncode == 130 and took < EXIT_AFTER_SIGNAL_S, (fault, process.returncode, took, out[-3000:])
            assert "interrupted; the stage that was running is marked interrupted" in out
            assert run.read_marker("train")["status"] == "interrupted", fault
            assert run.stage_statuses()["train"] == "interrupted", fault
            assert flow_runs_in(home, "RUNNING", "PENDING") == [], fault
        else:
            assert process.returncode == -signal.SIGKILL
            assert flow_runs_in(home, "RUNNING"), "a SIGKILL leaves the flow runs RUNNING until a later run"
    rc, out = run_mpo(["run", "--config", str(path)], env, folder / "interrupted-final.log")
    assert rc == 0, out[-3000:]
    assert "was left running by a killed mpo process: marked Crashed" in out
    assert flow_runs_in(home, "RUNNING", "PENDING") == []
    info = json.loads((run_dir / "train" / "model" / "mpo_train.json").read_text())
    assert info["global_step"] == MAX_STEPS
    steps = [e["step"] for e in json.loads((run_dir / "train" / "model" / "log_history.json").read_text()) if "loss" in e]
    assert steps == list(range(1, MAX_STEPS + 1)), steps
    assert content_hashes(run_dir) == content_hashes(undisturbed_dir)


def test_a_lost_prefect_server_is_named_in_bounded_time_and_the_rerun_resumes(undisturbed, suite):
    """A separately started server stopped during training: mpo ends within runtime.api_unreachable_s and a
    grace, naming the URL and what to do; with the server back, the rerun resumes and finishes."""
    undisturbed_dir = undisturbed[0]
    folder, recipe = suite
    path = recipe("lost-server")
    run_dir = folder / "runs" / "lost-server"
    server = PrefectServer(folder / "home-lost-server").start()
    try:
        env = _env(server.home, server.api_url)
        log = folder / "lost-server.log"
        process = start_mpo(["run", "--config", str(path), "--set", "runtime.api_unreachable_s=10"], env, log)
        try:
            wait_for_checkpoint(run_dir, 2, process, log)
            tree = descendants(process.pid)
            stop(server.process)
            took = _stopped_by_signal(process, time.monotonic())
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        out = log.read_text(encoding="utf-8", errors="replace")
        print(f"server stopped during training: mpo ended {took:.1f} s after it, exit {process.returncode}")
        assert process.returncode == 2 and took < 10 + 2 + 15 + 15, (process.returncode, took, out[-3000:])
        assert f"the Prefect API at {server.api_url} has not answered for 10 s" in out
        assert "start that server again" in out
        assert_no_orphans(tree)
        assert RunFolder(run_dir).stage_statuses()["train"] == "interrupted"

        server.start()
        rc, out = run_mpo(["run", "--config", str(path)], env, folder / "lost-server-rerun.log")
        assert rc == 0, out[-3000:]
        assert flow_runs_in(server.home, "RUNNING", "PENDING") == []
        assert content_hashes(run_dir) == content_hashes(undisturbed_dir)
    finally:
        server.stop()

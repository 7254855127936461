"""Every benchmark in ``benchmarks/`` runs in CI in its smoke mode (``--smoke``: tiny sizes), as a person runs
it: a subprocess of this Python from the repository root. Its last line must carry the figures it prints, so a
benchmark that no longer runs, or no longer reports, fails here; a benchmark file this module does not know
fails too. Outputs, temporary files and Prefect's home go under the test's ``tmp_path``; a process a
benchmark leaves behind (a language-id worker, a Prefect server) fails the test and is killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
MARKER = "MPO_BENCHMARK_SMOKE"  # in every process a smoke run starts: survivors are found by it

FLOAT = r"\d+(?:\.\d+)?"  # a non-negative figure
SHARE = r"[01]\.\d{3}"  # a rate in [0, 1], three decimals
SIGNED = r"-?\d+\.\d{3}"  # a difference, three decimals


@dataclass(frozen=True)
class Smoke:
    args: tuple[str, ...]  # after --smoke; "{tmp}" is the test's tmp_path
    last_line: str  # the whole last line, a regular expression
    timeout_s: int
    needs_data: bool = True  # reads ../shared/data
    slow: bool = True  # the real default model or a Prefect server (pyproject's ``slow`` marker)


SMOKES: dict[str, Smoke] = {
    "align_select.py": Smoke(
        ("--out", "{tmp}/align_select"),
        rf"align_select_seconds={FLOAT} candidates=1 best=dpo_12 best_asr={SHARE} best_over_refusal={SHARE} "
        rf"best_selectivity={SIGNED}",
        timeout_s=600, needs_data=False,
    ),
    "eval_base.py": Smoke(
        ("--out", "{tmp}/eval_base"),
        rf"eval_base_seconds={FLOAT} responses=[1-9]\d* datasets=\{{'seed': '\d+ prompts', "
        r"'multijail': '\d+ prompts', 'pairs:llama_mpo_data': '\d+ pairs'\}",
        timeout_s=300,
    ),
    "filter_scale.py": Smoke((), r"filter_rows_per_s=[1-9]\d* peak_rss_mb=[1-9]\d*", timeout_s=300, slow=False),
    # vLLM's figures are nan only where it cannot be imported (CI installs it: make test)
    "generate.py": Smoke((), rf"vllm_over_transformers=(?:{FLOAT}|nan) vllm_startup_s=(?:{FLOAT}|nan)",
                         timeout_s=480, needs_data=False),
    "main_job.py": Smoke(
        ("--root", "{tmp}/runs"), rf"main_job_s={FLOAT} worst_stage_over_floor={FLOAT}", timeout_s=600,
        needs_data=False,
    ),
    "shard_scale.py": Smoke((), rf"shard_speedup_2={FLOAT}", timeout_s=900, needs_data=False),
    "train_step.py": Smoke(
        (),
        rf"step_time_ratio_online_over_precomputed={FLOAT} peak_mem_ratio_online_over_precomputed={FLOAT} "
        rf"mfu={FLOAT}",
        timeout_s=600,
    ),
    "transfer.py": Smoke(
        ("--root", "{tmp}/runs"),
        rf"mpo_drop_clean={SIGNED} dpo_drop_clean=nan mpo_drop_noisy=nan dpo_drop_noisy=nan "
        rf"english_change_mpo={SIGNED} over_refusal_change_mpo={SIGNED}",
        timeout_s=900,
    ),
}


def test_every_benchmark_has_a_smoke_run():
    """A new benchmark file cannot escape CI: it must be listed above (and a listed one must exist)."""
    on_disk = sorted(str(p.relative_to(BENCHMARKS)) for p in BENCHMARKS.rglob("*.py"))
    assert on_disk == sorted(SMOKES), "benchmarks/ and SMOKES differ: give the new benchmark a --smoke run here"


def _environment(tmp: Path, marker: str) -> dict[str, str]:
    """This process's environment without Prefect settings (a configured server, a profile), with Prefect's home
    and the temporary folder under ``tmp``, offline hubs, this checkout first on the path, and the marker. One
    torch thread unless set: on a busy machine two threads each waiting for a core made the smoke runs about
    10x slower (generate.py: 73 s against 19 s at a load average of 10 on 2 cores); the figures of a smoke
    run are not the point."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    (tmp / "tmp").mkdir()
    env.update(
        PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", TMPDIR=str(tmp / "tmp"),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **{MARKER: marker},
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _left_behind(marker: str, grace_s: float = 15.0) -> list[str]:
    """The processes started by a smoke run still alive ``grace_s`` after it ended (killed, described)."""
    deadline = time.monotonic() + grace_s
    while (alive := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    described = []
    for proc in alive:
        try:
            described.append(f"{proc.pid}: {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=10)
    return described


def test_a_process_left_behind_is_found_and_killed(tmp_path):
    """The guard of the smoke runs works: a grandchild that outlives its parent, in a session of its own (as a
    daemonised server would be), is found by the marker it inherited, reported and killed."""
    marker = uuid.uuid4().hex
    sleeper = "import time; time.sleep(300)"
    code = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleeper!r}], start_new_session=True)"
    subprocess.run([sys.executable, "-c", code], env=_environment(tmp_path, marker), check=True, timeout=60)
    left = _left_behind(marker, grace_s=1.0)
    assert len(left) == 1 and sleeper in left[0], left
    assert not _processes_with(marker)


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[pytest.mark.slow] if smoke.slow else []) for name, smoke in SMOKES.items()]
)
def test_benchmark_smoke_run_reports_its_figures(name, tmp_path, request):
    smoke = SMOKES[name]
    if smoke.needs_data:
        request.getfixturevalue("shared_data")  # skips with the reason where the real data is absent
    marker = uuid.uuid4().hex
    cmd = [sys.executable, str(BENCHMARKS / name), "--smoke", *(a.replace("{tmp}", str(tmp_path)) for a in smoke.args)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_environment(tmp_path, marker), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        output, errors = proc.communicate(timeout=smoke.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, errors = proc.communicate()
        _left_behind(marker, grace_s=0)
        pytest.fail(f"{name} --smoke ran past {smoke.timeout_s} s:\n{output[-3000:]}\n{errors[-3000:]}")
    seconds = time.perf_counter() - started
    left = _left_behind(marker)
    assert proc.returncode == 0, f"{name} --smoke exited with {proc.returncode}:\n{output[-3000:]}\n{errors[-3000:]}"
    assert not left, f"{name} --smoke left processes behind: {left}"
    lines = output.strip().splitlines()
    assert lines, f"{name} --smoke printed nothing:\n{errors[-3000:]}"
    assert re.fullmatch(smoke.last_line, lines[-1]), f"{name} --smoke, last line:\n{lines[-1]}\n{output[-3000:]}"
    print(f"{name} --smoke: {seconds:.1f} s; {lines[-1]}")

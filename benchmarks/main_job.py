"""The main job (``make run``: the default recipe) profiled per stage and phase, against its compute floor.

Runs ``mpo run --config configs/default.yaml`` in a fresh run root with a fresh Prefect home (a subprocess,
as a user runs it), then prints, per stage, its seconds (as the runner recorded them), the seconds of each
phase inside it (load, prefill, decode, forward, backward, optimizer, io, other: each stage's
``profile.json``, :mod:`mpo_core.plumbing.profile`), the process CPU seconds, the FLOPs the stage had to do
(``6 N`` per trained token, ``2 N`` per token of a forward or of generation, real tokens only) and the floor:
those FLOPs at this machine's fp32 matmul peak (measured here as ``benchmarks/train_step.py`` measures it).
``over_floor`` is seconds / floor, ``cpu/floor`` the stage's process CPU seconds / floor (the figure to
compare on a loaded machine, where a stage waits for a core; with several threads CPU seconds add up). Prefect and process overhead is the job's wall time less its stages'.
The load average beside it says how far the seconds can be trusted on a shared machine.

``--show RUN_DIR`` prints the profile of an existing run; ``--smoke`` (what CI runs): a tiny recipe, for the
code path, not the figures. The last line is ``main_job_s=<t> worst_stage_over_floor=<r>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from mpo_core.plumbing.profile import OTHER, PHASES, read_profile
from mpo_core.plumbing.stage_table import STAGES

JOB_FILE = "main_job.json"  # beside the run's stages: the job's wall time, CPU, peak and load
SMOKE_OVERRIDES = [
    "prompts.limit=6", "run.target_langs=[zh]", "align.max_harmful=2", "align.max_benign=2",
    "align.max_steps=1", "align.per_device_batch_size=2", "align.answer_max_new_tokens=4", "align.save_steps=1",
    "generate.max_new_tokens=4", "reference.max_length=64", "reference.min_safe_share=0.0",
    "reference.drop_unsafe_pairs=false", "train.max_length=64", "train.max_steps=1", "train.save_steps=1",
    "evaluate.max_length=64", "evaluate.max_new_tokens=4", "evaluate.max_pairs_per_lang=1",
    "evaluate.bootstrap_samples=10",
]


def job_threads(overrides: list[str]) -> int:
    """The ``runtime.threads`` the job runs with: the last override of it, else the default."""
    from mpo_core.plumbing.config import RuntimeConfig

    given = [o.split("=", 1)[1] for o in overrides if o.startswith("runtime.threads=")]
    return int(given[-1]) if given else RuntimeConfig().threads


def run_job(config: str, root: Path, name: str, overrides: list[str]) -> dict:
    """``mpo run`` of ``config`` into ``root/name`` with Prefect's home under ``root``: wall and CPU seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(root / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", config,
           "--set", f"run.root={root}", "--set", f"run.name={name}"]
    for override in overrides:
        cmd += ["--set", override]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": seconds, "cpu_seconds": cpu, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def stage_rows(run_dir: Path, peak_gflops: float) -> list[dict]:
    """One row per stage that completed: the seconds its marker recorded, its profile's phases, FLOPs, floor
    and ratios."""
    rows = []
    for stage in [s.name for s in STAGES]:
        marker = run_dir / stage / "stage.json"  # the stage's last complete run, also after skipped reruns
        record = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
        if record.get("status") != "complete":
            continue
        prof = read_profile(run_dir / stage) or {"phases": {}, "cpu_seconds": None, "threads": None}
        flops = sum(p["flops"] for p in prof["phases"].values())
        floor = flops / (peak_gflops * 1e9) if peak_gflops > 0 else 0.0
        seconds = float(record.get("seconds") or 0.0)
        rows.append({
            "stage": stage, "seconds": seconds, "cpu_seconds": prof.get("cpu_seconds"),
            "threads": prof.get("threads"), "phases": prof["phases"], "flops": flops, "floor_s": floor,
            "over_floor": seconds / floor if floor > 0 else None,
            "cpu_over_floor": prof["cpu_seconds"] / floor if floor > 0 and prof.get("cpu_seconds") else None,
        })
    return rows


def _cell(phase: dict | None) -> str:
    if not phase or phase["seconds"] < 0.05:
        return "-"
    return f"{phase['seconds']:.1f}"


def print_profile(run_dir: Path, job: dict | None, peak_gflops: float) -> tuple[float, float]:
    """Print the profile table of ``run_dir``; return (job seconds, worst stage's seconds over its floor)."""
    rows = stage_rows(run_dir, peak_gflops)
    names = [*PHASES, OTHER]
    print(f"profile of {run_dir} (matmul peak {peak_gflops:.1f} GFLOP/s fp32)")
    print(f"{'stage':<10} {'s':>7} {'cpu_s':>7} {'thr':>3} " + " ".join(f"{n:>9}" for n in names)
          + f" {'TFLOP':>7} {'floor_s':>7} {'over_floor':>10} {'cpu/floor':>9}")
    for r in rows:
        cpu = "-" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.1f}"
        ratio = "-" if r["over_floor"] is None else f"{r['over_floor']:.1f}"
        cpu_ratio = "-" if r["cpu_over_floor"] is None else f"{r['cpu_over_floor']:.1f}"
        print(f"{r['stage']:<10} {r['seconds']:7.1f} {cpu:>7} {r['threads'] or '-'!s:>3} "
              + " ".join(f"{_cell(r['phases'].get(n)):>9}" for n in names)
              + f" {r['flops'] / 1e12:7.3f} {r['floor_s']:7.2f} {ratio:>10} {cpu_ratio:>9}")
    stages_s = sum(r["seconds"] for r in rows)
    total = job["seconds"] if job else stages_s
    if job:
        print(f"job: {total:.1f} s wall, {job['cpu_seconds']:.1f} s CPU; stages {stages_s:.1f} s; Prefect and "
              f"process overhead {total - stages_s:.1f} s; load average before {job['loadavg_before']}, "
              f"after {job['loadavg_after']}")
    tokens = {n: sum(r["phases"].get(n, {}).get("tokens", 0) for r in rows) for n in ("prefill", "decode", "forward", "backward")}
    print("real tokens: " + ", ".join(f"{n} {t}" for n, t in tokens.items()))
    worst = max((r["over_floor"] for r in rows if r["over_floor"] is not None), default=0.0)
    return total, worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--root", help="a fresh run root (default: runs/main-job-<time>)")
    parser.add_argument("--name", default="default", help="run name (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--show", metavar="RUN_DIR", help="print the profile of an existing run instead")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the peak-measuring matmul")
    parser.add_argument("--peak-gflops", type=float,
                        help="with --show: floors at this peak (e.g. to put two runs side by side at one peak)")
    parser.add_argument("--smoke", action="store_true", help=f"tiny recipe for CI: {SMOKE_OVERRIDES}")
    args = parser.parse_args(argv)
    from train_step import matmul_peak_gflops

    if args.show:
        run_dir = Path(args.show)
        job = json.loads((run_dir / JOB_FILE).read_text()) if (run_dir / JOB_FILE).is_file() else None
        peak = args.peak_gflops or (job["matmul_peak_gflops"] if job else matmul_peak_gflops(args.matmul_size))
    else:
        if args.smoke:
            args.set = SMOKE_OVERRIDES + args.set
            args.matmul_size = min(args.matmul_size, 256)
        root = Path(args.root or ROOT / "runs" / f"main-job-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
        if root.exists() and any(root.iterdir()):
            parser.error(f"--root {root} is not empty: the main job is measured in a fresh run root")
        root.mkdir(parents=True, exist_ok=True)
        import torch

        torch.set_num_threads(job_threads(args.set) or torch.get_num_threads())  # the stages' own threads
        peak = matmul_peak_gflops(args.matmul_size)
        job = run_job(args.config, root, args.name, args.set)
        job["matmul_peak_gflops"] = peak
        job["overrides"] = args.set
        run_dir = root / args.name
        (run_dir / JOB_FILE).write_text(json.dumps(job, indent=1), encoding="utf-8")
    total, worst = print_profile(run_dir, job, peak)
    print(f"main_job_s={total:.1f} worst_stage_over_floor={worst:.1f}")


if __name__ == "__main__":
    main()

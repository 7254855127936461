"""CI runs the GPU check's code on the CPU (``scripts/gpu-check.sh --cpu-smoke``), so that the script, the
``gpu`` tests and the synthetic benchmark cannot rot between GPU loans."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_and_reports_the_three_figures():
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--cpu-smoke"],
        check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\d+ passed", result.stdout), result.stdout[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"gpu_step_ratio=[\d.]+ gpu_peak_mem_ratio=[\d.]+ gpu_mfu=[\d.]+", last), last

"""Shared fixtures: real data from ../shared/data, the embedded default model, temporary run folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MPO_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the suite runs servers, workers, shards and engines side by side on two cores: one torch thread per stage
# process (runtime.threads' default, one per core, would have them wait for each other)
os.environ.setdefault("MPO_THREADS", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data sets; tests that need them skip with a reason where they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set MPO_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def default_model_config():
    """The embedded default model on CPU in float32 (converted and cached once per machine)."""
    from mpo_core.plumbing.config import ModelConfig

    return ModelConfig(device="cpu", dtype="float32")


GPU_TESTS_ON_CPU = os.environ.get("MPO_GPU_TESTS_ON_CPU") == "1"  # scripts/gpu-check.sh --cpu-smoke


@pytest.fixture(scope="session")
def check_device() -> str:
    """Where the ``gpu`` tests run: CUDA, or the CPU under ``scripts/gpu-check.sh --cpu-smoke``."""
    return "cpu" if GPU_TESTS_ON_CPU else "cuda"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available() or GPU_TESTS_ON_CPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

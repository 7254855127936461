"""Progress reporting for long steps: a tqdm bar in the terminal plus optional listeners.

``mpo_core`` knows nothing of Prefect. The orchestration layer registers a listener (for example one that
updates a Prefect progress artifact) with :func:`progress_listener`; every :func:`track` loop then reports
to the terminal bar and to each listener. :func:`phase` names what a stage is doing ("base model",
"loading model"): trackers inside it carry the phase in their description ("base model: generate"), and
the phase's start and end are logged through :mod:`logging` (logger ``mpo_core``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
Listener = Callable[[str, int, int], None]  # (description, done, total)

logger = logging.getLogger(__name__)

_listeners: contextvars.ContextVar[tuple[Listener, ...]] = contextvars.ContextVar("mpo_progress", default=())
_phases: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("mpo_phase", default=())


def round_seconds(seconds: float) -> float:
    """Durations as mpo records and shows them: seconds to one decimal (the one rounding rule)."""
    return round(float(seconds), 1)


def _described(desc: str) -> str:
    """``desc`` behind the enclosing phases: ``"trained model: generate"``."""
    return ": ".join((*_phases.get(), desc))


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A named phase of a stage: logged when it starts and ends, reported to listeners as
    ``(name, 0, 0)`` at its start (so something shows while, say, a model loads), and prefixed to the
    description of every tracker inside it."""
    label = _described(name)
    logger.info("%s ...", label)
    for listener in _listeners.get():
        listener(label, 0, 0)
    started = time.perf_counter()
    token = _phases.set(_phases.get() + (name,))
    try:
        yield
    finally:
        _phases.reset(token)
    logger.info("%s done in %s s", label, round_seconds(time.perf_counter() - started))


@contextlib.contextmanager
def progress_listener(listener: Listener) -> Iterator[None]:
    """Within the block, every :func:`track` loop also calls ``listener(desc, done, total)``."""
    token = _listeners.set(_listeners.get() + (listener,))
    try:
        yield
    finally:
        _listeners.reset(token)


class Tracker:
    """A manually advanced progress bar (``update(n)``) that also reports to listeners."""

    def __init__(self, total: int, desc: str, unit: str = "it", every: int = 1) -> None:
        self.total, self.desc, self.done, self.unit = total, _described(desc), 0, unit
        self._started, self._closed = time.perf_counter(), False
        self._every = max(1, every)
        self._last = 0
        self._bar = tqdm(total=total, desc=self.desc, unit=unit, dynamic_ncols=True, leave=False)
        self._notify(force=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        self._notify()

    def _notify(self, force: bool = False) -> None:
        if self.total == 0:  # (desc, 0, 0) announces a phase; an empty loop reports nothing
            return
        if force or self.done - self._last >= self._every or self.done >= self.total:
            self._last = self.done
            for listener in _listeners.get():
                listener(self.desc, self.done, self.total)

    def close(self) -> None:
        self._bar.close()
        if self.total and not self._closed:
            self._closed = True
            logger.info("%s: %d/%d %s in %s s", self.desc, self.done, self.total, self.unit,
                        round_seconds(time.perf_counter() - self._started))

    def __enter__(self) -> Tracker:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(iterable: Iterable[T], total: int, desc: str, unit: str = "it") -> Iterator[T]:
    """Iterate ``iterable`` while showing and reporting progress (``total`` items)."""
    with Tracker(total, desc, unit, every=max(1, total // 100)) as tracker:
        for item in iterable:
            yield item
            tracker.update(1)

"""Child processes that never outlive ``mpo``: each in its own process group (a Ctrl-C in the terminal
reaches ``mpo`` alone, which then stops them in order), killed by the kernel if ``mpo`` dies first
(``PR_SET_PDEATHSIG``), and stopped as a group, grandchildren included, when the caller's block ends."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 10.0


def _die_with_parent() -> None:
    """In the child, before ``exec``: the kernel sends SIGKILL when the parent thread that started it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def start_group(args: Sequence[str], **popen: Any) -> subprocess.Popen:
    """Start ``args`` as the leader of a new session and process group that dies with this process."""
    # preexec_fn is the only hook between fork and exec; _die_with_parent makes one prctl call, no lock taken
    return subprocess.Popen(list(args), start_new_session=True, preexec_fn=_die_with_parent, **popen)  # noqa: PLW1509


def stop_group(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the child's whole process group, SIGKILL after ``grace_s``; the child reaped."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # grandchildren left in the group
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def group(args: Sequence[str], **popen: Any) -> Iterator[subprocess.Popen]:
    """:func:`start_group`, stopped with :func:`stop_group` when the block ends, however it ends."""
    process = start_group(args, **popen)
    try:
        yield process
    finally:
        stop_group(process)


def run_group(args: Sequence[str], **popen: Any) -> None:
    """Run ``args`` in its own process group and wait; an interrupt of this process (Ctrl-C, SIGTERM, a
    failure) stops the whole group first. A non-zero exit is a ``CalledProcessError``."""
    with group(args, **popen) as process:
        returncode = process.wait()
    if returncode != 0:
        raise subprocess.CalledProcessError(returncode, list(args))

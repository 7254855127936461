"""The project's error types: each message names the file, column and row where it can."""

import errno
import gzip
from pathlib import Path


class MPOError(Exception):
    """Base of every error mpo raises on purpose."""


class ConfigError(MPOError):
    """A recipe or override is invalid (unknown key, wrong type, value out of range)."""


class ArtifactError(MPOError):
    """An artifact is missing, corrupt, or does not match its schema or manifest."""


class InputDataError(MPOError):
    """A user-supplied data file cannot be ingested (names file, column and row)."""


class ModelLoadError(MPOError):
    """A model cannot be loaded safely (missing files, pickle-only weights, remote code not allowed)."""


class GenerationError(MPOError):
    """A backend gave no finished completion for a request (vLLM aborted it)."""


# Faults that can pass on a retry, by class: I/O and network failures (``OSError``, which covers
# ``ConnectionError``, ``TimeoutError`` and the ``requests`` errors), memory exhaustion (host or GPU), and
# the transport errors of ``httpx`` (the hub client's), named so that neither torch nor httpx is imported.
# ``OSError`` subclasses that say a path or a file's content is wrong are permanent.
_NOT_TRANSIENT_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                            PermissionError, gzip.BadGzipFile)
_TRANSIENT_CLASS_NAMES = {"torch.OutOfMemoryError", "httpx.TransportError"}


def is_transient_error(err: BaseException) -> bool:
    """True if ``err`` is a fault that can pass on a retry (I/O, network, out of memory), False for bad input.

    Decided by class, never by listing bad-input errors: everything is permanent (bad config or data, a
    bug) unless it is an ``OSError`` other than a wrong path or content (missing file, no permission, file
    where a folder is expected, not gzip), a ``MemoryError``, CUDA's ``OutOfMemoryError`` or an ``httpx``
    transport error. Our own :class:`MPOError` is always permanent, and so is ``UnicodeDecodeError`` (a
    ``ValueError``), and so is a full disk or a read-only file system (ENOSPC, EDQUOT, EROFS). A multi-GPU child that exits non-zero (``CalledProcessError``) is not retried either:
    its cause is not known here.
    """
    if isinstance(err, MPOError):
        return False
    if isinstance(err, OSError):
        return not isinstance(err, _NOT_TRANSIENT_OS_ERRORS) and err.errno not in _STORAGE_ERRNOS
    if isinstance(err, MemoryError):
        return True
    return any(f"{cls.__module__}.{cls.__qualname__}" in _TRANSIENT_CLASS_NAMES for cls in type(err).__mro__)


class DiskFullError(MPOError):
    """The file system a stage writes to has too little free space (checked before writing, or ENOSPC)."""


class ReadOnlyRunError(MPOError):
    """The run folder (or its root) cannot be written: a read-only file system or no write permission."""


class RunLockedError(MPOError):
    """Another live process is writing this run (its lock names the holder's pid, host and start time)."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY_ERRNOS = frozenset({errno.EROFS})
_STORAGE_ERRNOS = DISK_FULL_ERRNOS | READ_ONLY_ERRNOS


def storage_error(err: BaseException, where: str | Path) -> MPOError | None:
    """The named error for an ``OSError`` that says the disk under ``where`` is full or read-only (neither
    passes on a retry), else None."""
    if not isinstance(err, OSError):
        return None
    if err.errno in DISK_FULL_ERRNOS:
        return DiskFullError(f"{where}: no space left on the device ({err.strerror}: {err.filename or ''}); "
                             "free space there or move run.root, then rerun: the run resumes")
    if err.errno in READ_ONLY_ERRNOS:
        return ReadOnlyRunError(f"{where}: the file system is read-only ({err.filename or ''}); "
                                "a run is written in place: give it a writable run.root")
    return None


class OrchestrationUnreachableError(MPOError):
    """The orchestrator's API (the Prefect server) has not answered for longer than the run waits for it."""

"""The project's error types: each message names the file, column and row where it can."""

import gzip


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
    ``ValueError``). A multi-GPU child that exits non-zero (``CalledProcessError``) is not retried either:
    its cause is not known here.
    """
    if isinstance(err, MPOError):
        return False
    if isinstance(err, OSError):
        return not isinstance(err, _NOT_TRANSIENT_OS_ERRORS)
    if isinstance(err, MemoryError):
        return True
    return any(f"{cls.__module__}.{cls.__qualname__}" in _TRANSIENT_CLASS_NAMES for cls in type(err).__mro__)

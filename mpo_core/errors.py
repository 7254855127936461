"""The project's error types: each message names the file, column and row where it can."""


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

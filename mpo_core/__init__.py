"""mpo_core: the plain library behind mpo (no Prefect import anywhere in this package)."""

__version__ = "0.2.0"

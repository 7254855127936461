"""Thin Prefect tasks around the ``mpo_core`` stages (reporting, retries, limits; no stage logic)."""

from tasks.environment import apply_defaults

apply_defaults()

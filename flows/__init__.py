"""Prefect flows of the mpo pipeline: one per stage, the pipeline, and the ``mpo`` CLI.

Importing this package applies mpo's Prefect process settings (:mod:`tasks.environment`) before any flow
module imports Prefect; it stays light (no Prefect, no torch) so that ``import flows.cli`` is fast.
"""

import tasks  # noqa: F401  (applies tasks.environment defaults; light)

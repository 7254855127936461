"""The training loop's phases in the stage profile (:mod:`mpo_core.plumbing.profile`): a trainer callback.

A step runs from ``on_step_begin`` to ``on_pre_optimizer_step`` as ``backward`` (the model's forwards inside
it are ``forward``, counted by :func:`mpo_core.common.models.profiled_forwards`), then ``optimizer`` until
``on_optimizer_step``; from ``on_step_end`` to the next step (logging, checkpoint saving) is ``io``.
"""

from __future__ import annotations

from transformers import TrainerCallback

from mpo_core.plumbing import profile


class PhaseCallback(TrainerCallback):
    """Marks the phases of each training step; add it to any ``transformers``/TRL trainer."""

    def _close(self) -> None:
        while profile.open_phase() in ("backward", "optimizer", "io"):
            profile.end(profile.open_phase())

    def on_step_begin(self, args, state, control, **kwargs):
        self._close()
        profile.begin("backward")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._close()
        profile.begin("optimizer")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._close()

    def on_step_end(self, args, state, control, **kwargs):
        self._close()
        profile.begin("io")

    def on_train_end(self, args, state, control, **kwargs):
        self._close()

"""The trainers' Python side: :class:`MPOTrainer` (MPO and SimPO on ``transformers.Trainer``) and the
:class:`ProgressAndLog` callback every trainer gets.

:meth:`MPOTrainer.training_step` runs MPO's two backward passes (``lam * L2`` on the dominant side, then L1
on the target side, :func:`mpo_core.method.objective.mpo_backward_step`); ``RG^d`` and the reference's
pooled states come with each batch from the ``reference`` artifact, so no reference model is in memory.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from mpo_core.method.logps import sequence_outputs
from mpo_core.method.losses import mpo_l1_terms, reward_gap, simpo_loss
from mpo_core.method.objective import mpo_backward_step, mpo_step_loss, side
from mpo_core.plumbing.config import TrainConfig
from mpo_core.plumbing.errors import ConfigError
from mpo_core.plumbing.progress import Tracker
from mpo_core.results.stage_results import training_log_line
from mpo_core.training.checkpoints import AtomicCheckpoints
from mpo_core.training.sharding import reduce_gradients_in_fp32, shard_on_cpu_processes

logger = logging.getLogger(__name__)


class MPOTrainer(AtomicCheckpoints, Trainer):
    """``transformers.Trainer`` with the MPO (or SimPO) loss and per-target-language metrics; checkpoints
    written atomically (:class:`~mpo_core.training.checkpoints.AtomicCheckpoints`)."""

    def __init__(self, *args: Any, train_cfg: TrainConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:  # the Trainer would wrap the model in nn.DataParallel
            raise ConfigError(
                f"train.loss={train_cfg.loss} does not run under nn.DataParallel ({self.args.n_gpu} GPUs "
                "visible to one process): launch one process per GPU (accelerate launch or torchrun), "
                "or make one GPU visible (CUDA_VISIBLE_DEVICES=0)"
            )
        fsdp2 = self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2
        if (self.is_fsdp_enabled and not fsdp2) or self.is_deepspeed_enabled:
            raise ConfigError(
                f"train.loss={train_cfg.loss} shards with FSDP2 (train.sharding: fsdp2), or runs on one device "
                "or data-parallel (DDP); FSDP1 and DeepSpeed are not supported for it"
            )
        self.train_cfg = train_cfg
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._lang: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; with an FSDP plugin on CPU processes, FSDP instead of DDP
        (:func:`shard_on_cpu_processes`), and gradients reduced in fp32 under mixed precision."""
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None:  # again on every call: train() rebuilds the state
            self.is_fsdp_enabled |= shard_on_cpu_processes(self.accelerator, self.args.fsdp_plugin_args)
        if self.is_fsdp_enabled:
            reduce_gradients_in_fp32(self.accelerator.state.fsdp_plugin)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """MPO: :func:`~mpo_core.method.objective.mpo_backward_step` (two backward passes, same gradients); SimPO: the default."""
        cfg = self.train_cfg
        if cfg.loss != "mpo":
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / self.current_gradient_accumulation_steps
        loss, metrics, gaps = mpo_backward_step(
            model,
            inputs,
            cfg.beta,
            cfg.lam,
            backward=self.accelerator.backward,
            scale=scale,
            forward_context=self.mixed_precision_context,
        )
        self._record(
            metrics, inputs["target_lang"], gaps, mpo_l1_terms(gaps, inputs["ref_gap"], cfg.beta)
        )
        return loss * scale

    def mixed_precision_context(self) -> AbstractContextManager:
        """The trainer's loss context plus the accelerator's autocast (bf16/fp16 where the run asks for
        it). The accelerator wraps the model's own ``forward`` in autocast, but the MPO path calls the
        backbone and the LM head directly, so the autocast is entered here, for every launch alike."""
        stack = self.compute_loss_context_manager()
        stack.enter_context(self.accelerator.autocast())
        return stack

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.train_cfg
        if cfg.loss == "mpo":
            with self.mixed_precision_context():
                loss, metrics, gaps = mpo_step_loss(model, inputs, cfg.beta, cfg.lam)
            l1_rows = mpo_l1_terms(gaps, inputs["ref_gap"], cfg.beta)
        else:
            n = len(inputs["target_lang"])
            with self.mixed_precision_context():
                outputs = sequence_outputs(model, side(inputs, "target"), with_pooled=False, paired=True)
            target = outputs["avg_logps"]
            loss = simpo_loss(target[:n], target[n:], cfg.beta, cfg.simpo_gamma)
            gaps = reward_gap(target[:n], target[n:]).detach()
            metrics = {"target_gap": gaps.mean(), "target_gap_accuracy": (gaps > 0).float().mean()}
            l1_rows = None
        if model.training:
            self._record(metrics, inputs["target_lang"], gaps, l1_rows)
        return (loss, {}) if return_outputs else loss

    def _record(self, metrics, langs, gaps, l1_rows) -> None:
        for key, value in metrics.items():
            self._sums[key] += float(value)
        self._count += 1
        for i, lang in enumerate(langs):
            stats = self._lang[lang]
            stats["n"] += 1
            stats["target_gap"] += float(gaps[i])
            stats["target_gap_accuracy"] += float(gaps[i] > 0)
            if l1_rows is not None:
                stats["l1"] += float(l1_rows[i])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._count:
            logs.update({key: value / self._count for key, value in self._sums.items()})
            for lang, stats in sorted(self._lang.items()):
                for key, value in stats.items():
                    if key != "n":
                        logs[f"{key}/{lang}"] = value / stats["n"]
            self._sums.clear()
            self._count = 0
            self._lang.clear()
        super().log(logs, start_time)


class ProgressAndLog(TrainerCallback):
    """Progress through :mod:`mpo_core.plumbing.progress`, every logged step at INFO (every
    ``train.logging_steps``), the pickled ``training_args.bin`` removed from each checkpoint."""

    tracker: Tracker | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.tracker = Tracker(state.max_steps, "train")
        self.tracker.update(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            logger.info("train: %s", training_log_line(logs, state.global_step, state.max_steps))

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        (ckpt / "training_args.bin").unlink(missing_ok=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.close()


def trainer_callbacks() -> list[TrainerCallback]:
    """The callbacks every trainer of the project gets."""
    return [ProgressAndLog()]

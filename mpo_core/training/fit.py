"""Training a model on pairs: :func:`build_trainer` (MPO on ``transformers.Trainer`` with the precomputed reference,
and the baselines through TRL) and :func:`fit` (train, resume, save).

- ``train.loss: mpo`` (and ``simpo``): :class:`MPOTrainer`, a ``transformers.Trainer`` whose
  :meth:`~MPOTrainer.compute_loss` runs the policy on the target-language chosen/rejected sequences (response
  log-likelihoods through the chunked LM head, :mod:`mpo_core.method.logps`) and on the dominant-language sequences
  (backbone only, pooled states for L2), each pair's shared prompt run once; ``RG^d`` and the reference's
  pooled states come from the ``reference`` artifact, so no reference model is ever in memory. Because L1
  and L2 read disjoint sequences, each step runs two backward passes (``lam * L2`` on the dominant side,
  then ``L1`` on the target side), so only one side's activations are alive at a time
  (:func:`mpo_core.method.objective.mpo_backward_step`).
- ``dpo`` / ``ipo``: TRL's ``DPOTrainer`` (loss_type ``sigmoid`` / ``ipo``) and ``sft``: TRL's ``SFTTrainer``
  on the chosen responses, all on the target-language side of the same pairs.

Common to all: full fine-tuning or LoRA (peft), dropout off (paper), bf16 and gradient checkpointing only
where the config turns them on, FSDP2 sharding with fp32 master weights where ``train.sharding`` asks, gradient accumulation, checkpoints in ``out_dir/checkpoints`` with automatic
resume from the latest one, and the final model saved as safetensors with its tokenizer into ``out_dir/model``
atomically (a LoRA adapter is merged first, so the result loads like any model), with the trainer's own log
history beside it (``log_history.json``: ``trainer.state.log_history``, which every checkpoint's
``trainer_state.json`` holds and a resumed run restores, so each logged step appears once).

Checkpoints for resuming hold the model as safetensors; the optimizer, scheduler and RNG states are written
by ``transformers`` with ``torch.save`` and read back with ``torch.load(weights_only=True)`` (tensors and
plain containers only, no arbitrary objects); the pickled ``training_args.bin``, which resuming never reads,
is deleted after every save. Under FSDP2 (``train.sharding: fsdp2`` in several processes) a checkpoint holds
the model and optimizer shards as a torch distributed checkpoint (a file per rank, pickled ``.metadata``),
and the final model is gathered into a full state dict first. ``out_dir/model`` holds no pickle at all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from mpo_core.plumbing import profile
from mpo_core.plumbing.config import ModelConfig, PipelineConfig, TrainConfig
from mpo_core.plumbing.errors import InputDataError
from mpo_core.plumbing.stage_table import CHECKPOINT_DIR
from mpo_core.training.checkpoints import (
    MODEL_DIR,
    TRAINER_STATE,
    drop_outgrown_checkpoint,
    finished_checkpoint,
    keep_final_checkpoint,
    latest_checkpoint,
    save_model_atomically,
    with_atomic_checkpoints,
)
from mpo_core.training.examples import MPOCollator, build_examples, preference_rows
from mpo_core.training.profiling import PhaseCallback
from mpo_core.training.sharding import distributed_report, full_state_dict, sharding_arguments
from mpo_core.training.trainer import MPOTrainer, trainer_callbacks

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

OWN_TRAINER_LOSSES = ("mpo", "simpo")


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere (paper): ``nn.Dropout`` modules and attention-dropout rates."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _trains_on_every_row(cfg: TrainConfig, rows: int) -> bool:
    """Whether training reaches every one of ``rows`` pairs at least once. The reference is the frozen
    starting model: where it does, TRL computes the reference's log-probabilities once per pair before
    training (no second model in memory, no reference pass per step); where ``max_steps`` stops short of an
    epoch (the transfer sweep's cells: 8 steps of 2 over about 50 pairs), a reference pass per step costs
    only the pairs trained on. FSDP keeps TRL's per-step default either way."""
    if cfg.max_steps < 0:
        return cfg.num_epochs >= 1.0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return cfg.max_steps * cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world >= rows


def _common_arguments(cfg: TrainConfig, checkpoint_dir: Path, use_cpu: bool, seed: int) -> dict[str, Any]:
    return {
        "output_dir": str(checkpoint_dir),
        "per_device_train_batch_size": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.num_epochs,
        "max_steps": cfg.max_steps,
        "lr_scheduler_type": cfg.lr_scheduler,
        "warmup_steps": min(cfg.warmup_ratio, 0.999),
        "bf16": cfg.bf16,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "report_to": "none",
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "use_cpu": use_cpu,
        "seed": seed,
        **sharding_arguments(cfg),
    }


def _lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    lora = cfg.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def build_trainer(
    config: PipelineConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: pa.Table,
    reference: pa.Table | None,
    out_dir: Path,
):
    """The trainer of ``config.train.loss`` on ``pairs`` (a ``transformers.Trainer`` or a TRL trainer); its
    arguments are mpo's (:func:`_common_arguments` and the loss's own), ``train.trainer_args`` over them."""
    from mpo_core.common.models import resolve_device

    cfg = config.train
    use_cpu = resolve_device(config.model.device) == "cpu"
    seed = config.run.seed if cfg.seed is None else cfg.seed
    common = _common_arguments(cfg, out_dir / CHECKPOINT_DIR, use_cpu, seed)
    callbacks = trainer_callbacks()
    disable_dropout(model)
    if cfg.sharding == "fsdp2" and cfg.lora is None:
        model = model.float()  # fp32 master weights on every launch (FSDP2 keeps them sharded, compute in bf16)
    if cfg.loss in OWN_TRAINER_LOSSES:
        from transformers import TrainingArguments

        if cfg.lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, _lora_config(cfg))
        if common["gradient_checkpointing"]:
            common["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        examples = build_examples(
            tokenizer, pairs, reference, cfg.max_length, truncation=config.model.truncation
        )
        return MPOTrainer(
            model=model,
            args=TrainingArguments(**{**common, **cfg.trainer_args}),
            train_dataset=examples,
            data_collator=MPOCollator(
                tokenizer.pad_token_id, with_dominant=cfg.loss == "mpo" and cfg.lam > 0
            ),
            processing_class=tokenizer,
            callbacks=callbacks,
            train_cfg=cfg,
        )
    from datasets import Dataset

    trl_kwargs = {
        "model": model,
        "train_dataset": Dataset.from_list(preference_rows(pairs, cfg.loss)),
        "processing_class": tokenizer,
        "peft_config": _lora_config(cfg) if cfg.lora is not None else None,
        "callbacks": callbacks,
    }
    if cfg.loss == "sft":
        from trl import SFTConfig, SFTTrainer

        sft = {"max_length": cfg.max_length, "completion_only_loss": True}
        args = SFTConfig(**{**common, **sft, **cfg.trainer_args})
        return with_atomic_checkpoints(SFTTrainer)(args=args, **trl_kwargs)
    from trl import DPOConfig

    from mpo_core.training.packed_dpo import packed_dpo_trainer_class

    rows = len(trl_kwargs["train_dataset"])
    args = DPOConfig(**{
        **common,
        "beta": cfg.beta,
        "loss_type": ["sigmoid" if cfg.loss == "dpo" else "ipo"] + (["sft"] if cfg.sft_weight else []),
        "loss_weights": [1.0, cfg.sft_weight] if cfg.sft_weight else None,
        "max_length": cfg.max_length,
        "disable_dropout": True,
        "precompute_ref_log_probs": not sharding_arguments(cfg) and _trains_on_every_row(cfg, rows),
        **cfg.trainer_args,
    })
    try:
        trainer = with_atomic_checkpoints(packed_dpo_trainer_class())(args=args, **trl_kwargs)
    except ValueError as err:  # TRL dropped every pair, then precomputed the reference over none (torch.cat)
        if "non-empty" not in str(err):
            raise
        trainer = None
    if trainer is None or len(trainer.train_dataset) == 0:
        raise InputDataError(
            f"{cfg.loss}: TRL dropped every pair because its target prompt alone reaches "
            f"train.max_length={cfg.max_length} tokens; raise train.max_length"
        )
    return trainer


def fit(
    config: PipelineConfig,
    model_cfg: ModelConfig,
    pairs: pa.Table,
    reference: pa.Table | None,
    out_dir: Path,
    info: dict[str, Any],
) -> Path:
    """Train ``model_cfg`` with ``config.train`` on ``pairs`` in ``out_dir``, resuming from its latest
    checkpoint, and save the result with ``info`` (plus step and loss) and the log history to
    ``out_dir/model``."""
    from mpo_core.common.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_cfg, padding_side="right")
    model = load_model(model_cfg)
    trainer = build_trainer(config, model, tokenizer, pairs, reference, out_dir)
    trainer.add_callback(PhaseCallback())

    main_process = trainer.is_world_process_zero()  # under torchrun / accelerate launch, one rank writes
    if main_process:  # by one rank: incomplete checkpoints, and a finished one of another step limit, removed
        latest_checkpoint(out_dir)
        drop_outgrown_checkpoint(out_dir, trainer.args.max_steps)
    trainer.accelerator.wait_for_everyone()
    finished = None if trainer.is_fsdp_enabled else finished_checkpoint(out_dir, trainer.args.max_steps)
    if finished is not None:  # training ended, the model was lost: rebuilt from the last checkpoint
        train_loss = _rebuild_from(trainer, finished)
    else:
        resume = latest_checkpoint(out_dir)
        train_loss = trainer.train(resume_from_checkpoint=str(resume) if resume else None).training_loss
    info = {
        **info,
        "loss": config.train.loss,
        "global_step": trainer.state.global_step,
        "train_loss": train_loss,
        "base_model": model_cfg.name_or_path,
        "distributed": distributed_report(trainer),
    }
    # under FSDP2 the full weights are gathered by every rank together (a collective), then rank 0 writes them
    state_dict = full_state_dict(trainer.model)
    target = out_dir / MODEL_DIR
    if main_process:
        with profile.timed("io"):
            save_model_atomically(trainer.model, tokenizer, target, info, state_dict, trainer.state.log_history)
            keep_final_checkpoint(out_dir, json.dumps(dataclasses.asdict(trainer.state), indent=2))
    trainer.accelerator.wait_for_everyone()
    return target


def _rebuild_from(trainer, checkpoint: Path) -> float:
    """Load a finished checkpoint's weights and trainer state (kept by :func:`keep_final_checkpoint`) into
    ``trainer`` without training; returns the recorded training loss."""
    from transformers import TrainerState

    logger.info("train: %s is the end of training; the model is rebuilt from it, not retrained", checkpoint)
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE))
    summary = [entry for entry in trainer.state.log_history if "train_loss" in entry]
    return summary[-1]["train_loss"] if summary else float("nan")

"""The train stage: MPO on ``transformers.Trainer`` with the precomputed reference, and the baselines.

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

import json
import logging
import os
from collections import defaultdict
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from mpo_core.method.encoding import collate_pairs, encode_prompt_responses
from mpo_core.method.logps import sequence_outputs
from mpo_core.method.losses import mpo_l1_terms, reward_gap, simpo_loss
from mpo_core.method.objective import mpo_backward_step, mpo_step_loss, side
from mpo_core.method.premise import check_premise, split_by_reference_gap, training_split
from mpo_core.method.reference import check_reference_encoding
from mpo_core.plumbing.artifacts import atomic_directory
from mpo_core.plumbing.config import ModelConfig, PipelineConfig, TrainConfig
from mpo_core.plumbing.errors import ConfigError, InputDataError
from mpo_core.plumbing.progress import Tracker
from mpo_core.plumbing.stage_run import Artifact, StageRun
from mpo_core.plumbing.stage_table import CHECKPOINT_DIR
from mpo_core.results.stage_results import training_log_line

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODEL_DIR = "model"
LOG_HISTORY = "log_history.json"
TRAIN_INFO = "mpo_train.json"
OWN_TRAINER_LOSSES = ("mpo", "simpo")


def build_examples(
    tokenizer: PreTrainedTokenizerBase,
    pairs: pa.Table,
    reference: pa.Table | None,
    max_length: int,
    *,
    origin: str = "pairs",
    truncation: str = "prompt_left",
) -> list[dict[str, Any]]:
    """Tokenised training rows: target chosen/rejected, dominant chosen/rejected, the reference's gap and
    pooled states (joined on ``pair_id``). A pair missing from ``reference`` is an error naming it."""
    ref_rows: dict[str, dict[str, Any]] = {}
    if reference is not None:
        for row in reference.select(
            ["pair_id", "reward_gap", "chosen_pooled", "rejected_pooled"]
        ).to_pylist():
            ref_rows[row["pair_id"]] = row
    examples = []
    for i, row in enumerate(pairs.to_pylist()):
        example: dict[str, Any] = {"pair_id": row["pair_id"], "target_lang": row["target_lang"]}
        for lang_side in ("target", "dominant"):
            example[f"{lang_side}_chosen"], example[f"{lang_side}_rejected"] = encode_prompt_responses(
                tokenizer,
                row[f"{lang_side}_prompt"],
                [row[f"{lang_side}_chosen"], row[f"{lang_side}_rejected"]],
                max_length,
                truncation=truncation,
            )
        if reference is not None:
            ref = ref_rows.get(row["pair_id"])
            if ref is None:
                raise InputDataError(
                    f"{origin}: row {i}, column 'pair_id': {row['pair_id']!r} has no reference row"
                )
            example["ref_gap"] = ref["reward_gap"]
            example["ref_pooled"] = [ref["chosen_pooled"], ref["rejected_pooled"]]
        examples.append(example)
    return examples


class MPOCollator:
    """Collates :func:`build_examples` rows into right-padded ``target_*`` and ``dominant_*`` batches
    (chosen rows first, then rejected) plus ``ref_gap [B]`` and ``ref_pooled [2B, H]``."""

    def __init__(self, pad_token_id: int, with_dominant: bool = True) -> None:
        self.pad_token_id, self.with_dominant = pad_token_id, with_dominant

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"target_lang": [r["target_lang"] for r in rows]}
        sides = ("target", "dominant") if self.with_dominant else ("target",)
        for lang_side in sides:
            pairs = [(r[f"{lang_side}_chosen"], r[f"{lang_side}_rejected"]) for r in rows]
            for name, tensor in collate_pairs(pairs, self.pad_token_id).items():
                batch[f"{lang_side}_{name}"] = tensor
        if "ref_gap" in rows[0]:
            batch["ref_gap"] = torch.tensor([r["ref_gap"] for r in rows], dtype=torch.float32)
            if self.with_dominant:
                pooled = [r["ref_pooled"][0] for r in rows] + [r["ref_pooled"][1] for r in rows]
                batch["ref_pooled"] = torch.tensor(pooled, dtype=torch.float32)
        return batch


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere (paper): ``nn.Dropout`` modules and attention-dropout rates."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _trainer_class():
    from transformers import Trainer

    class MPOTrainer(Trainer):
        """``transformers.Trainer`` with the MPO (or SimPO) loss and per-target-language metrics."""

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

    return MPOTrainer


def _callbacks() -> list:
    from transformers import TrainerCallback

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

    return [ProgressAndLog()]


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


def _sharding_arguments(cfg: TrainConfig) -> dict[str, Any]:
    """FSDP2 through accelerate for ``train.sharding: fsdp2`` under a launcher with several processes
    (``WORLD_SIZE`` > 1): every decoder layer and the root sharded, parameters resharded after forward.
    Resume checkpoints are sharded (torch distributed checkpoint, each rank writes its own shard); the final
    model is gathered into a full state dict by :func:`fit`. One process has nothing to shard (and
    transformers refuses FSDP there); LoRA trains data-parallel (its frozen base is replicated, only the
    adapters train, and merging them needs the whole weights on one process)."""
    if cfg.sharding != "fsdp2" or cfg.lora is not None or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,
            "activation_checkpointing": cfg.gradient_checkpointing,  # FSDP's own: no extra all-gather
            "state_dict_type": "SHARDED_STATE_DICT",
        },
        "gradient_checkpointing": False,
    }


def shard_on_cpu_processes(accelerator, plugin_args: dict[str, Any]) -> bool:
    """Turn accelerate's state to FSDP on CPU processes (gloo), where it falls back to DDP.

    accelerate applies an FSDP plugin only to accelerator devices (``MULTI_GPU``, ...); torch's
    ``fully_shard`` runs on gloo too, so CPU processes get the same plugin and the same accelerate code
    (``fsdp2_prepare_model``, sharded checkpoints, full state dict on save). Returns whether it switched."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    return True


def reduce_gradients_in_fp32(plugin) -> None:
    """FSDP2 mixed precision: compute in the low dtype accelerate chose, gradients reduce-scattered in fp32
    (accelerate's default reduces in the compute dtype); the sharded master weights stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = plugin.mixed_precision_policy
    if policy is None or policy.param_dtype in (None, torch.float32):
        return
    plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=policy.param_dtype, reduce_dtype=torch.float32, output_dtype=policy.output_dtype
    )


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
        **_sharding_arguments(cfg),
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


def _preference_rows(pairs: pa.Table, loss: str) -> list[dict[str, Any]]:
    """TRL conversational rows on the target-language side of each pair."""
    rows = []
    for row in pairs.select(["target_prompt", "target_chosen", "target_rejected"]).to_pylist():
        prompt = [{"role": "user", "content": row["target_prompt"]}]
        chosen = [{"role": "assistant", "content": row["target_chosen"]}]
        if loss == "sft":
            rows.append({"prompt": prompt, "completion": chosen})
        else:
            rejected = [{"role": "assistant", "content": row["target_rejected"]}]
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


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
    callbacks = _callbacks()
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
        return _trainer_class()(
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
        "train_dataset": Dataset.from_list(_preference_rows(pairs, cfg.loss)),
        "processing_class": tokenizer,
        "peft_config": _lora_config(cfg) if cfg.lora is not None else None,
        "callbacks": callbacks,
    }
    if cfg.loss == "sft":
        from trl import SFTConfig, SFTTrainer

        sft = {"max_length": cfg.max_length, "completion_only_loss": True}
        args = SFTConfig(**{**common, **sft, **cfg.trainer_args})
        return SFTTrainer(args=args, **trl_kwargs)
    from trl import DPOConfig, DPOTrainer

    rows = len(trl_kwargs["train_dataset"])
    args = DPOConfig(**{
        **common,
        "beta": cfg.beta,
        "loss_type": ["sigmoid" if cfg.loss == "dpo" else "ipo"] + (["sft"] if cfg.sft_weight else []),
        "loss_weights": [1.0, cfg.sft_weight] if cfg.sft_weight else None,
        "max_length": cfg.max_length,
        "disable_dropout": True,
        "precompute_ref_log_probs": not _sharding_arguments(cfg) and _trains_on_every_row(cfg, rows),
        **cfg.trainer_args,
    })
    try:
        trainer = DPOTrainer(args=args, **trl_kwargs)
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


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` folder under ``out_dir/checkpoints`` (None if there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    last = get_last_checkpoint(str(folder))
    return Path(last) if last else None


def unsharded_model(model: PreTrainedModel, state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A plain model of ``model``'s architecture holding the gathered ``state_dict`` (its tensors, no copy).

    ``save_pretrained`` reads the parameters of the model it saves (tied-weight detection); under FSDP2 those
    are sharded DTensors whose every read is a collective, which one writing rank cannot complete."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(state_dict, assign=True)
    plain.tie_weights()
    return plain


def save_model_atomically(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    info: dict,
    state_dict=None,
    log_history: list[dict[str, Any]] | None = None,
) -> Path:
    """Save ``model`` (LoRA merged) as safetensors + tokenizer + ``mpo_train.json`` (+ ``log_history.json``,
    the trainer's log history) into ``target``, via a temporary sibling folder renamed into place;
    ``state_dict``: the full weights of a sharded model."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if state_dict is not None:
        model, state_dict = unsharded_model(model, state_dict), None
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAIN_INFO).write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
        if log_history is not None:
            (tmp / LOG_HISTORY).write_text(json.dumps(log_history, indent=1), encoding="utf-8")
    return target


def distributed_report(trainer) -> dict[str, Any]:
    """How the trained model was laid out, read from the model itself: processes, FSDP version (2 where the
    root is a ``fully_shard`` module), how many parameters are sharded (``DTensor``), the master weights'
    dtype, the compute and gradient-reduction dtypes of FSDP2's mixed precision, and how many layers FSDP's
    activation checkpointing wraps."""
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    parameters = list(trainer.model.parameters())
    sharded = isinstance(trainer.model, FSDPModule)
    policy = trainer.model._get_fsdp_state()._mp_policy if sharded else None  # what fully_shard was given
    master = parameters[0].dtype
    return {
        "processes": dist.get_world_size() if dist.is_initialized() else 1,
        "fsdp_version": 2 if sharded else None,
        "parameters": len(parameters),
        "sharded_parameters": sum(isinstance(p, DTensor) for p in parameters),
        "master_dtype": str(master).removeprefix("torch."),
        "compute_dtype": str(getattr(policy, "param_dtype", None) or master).removeprefix("torch."),
        "reduce_dtype": str(getattr(policy, "reduce_dtype", None) or master).removeprefix("torch."),
        "mixed_precision": trainer.accelerator.state.mixed_precision,
        "checkpointed_layers": sum(isinstance(m, CheckpointWrapper) for m in trainer.model.modules()),
    }


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full weights of an FSDP2-sharded model on rank 0's CPU (every rank must call it: the gather is a
    collective; the other ranks get an empty dict); None for a model that is not sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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

    resume = latest_checkpoint(out_dir)
    main_process = trainer.is_world_process_zero()  # under torchrun / accelerate launch, one rank writes
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    info = {
        **info,
        "loss": config.train.loss,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "base_model": model_cfg.name_or_path,
        "distributed": distributed_report(trainer),
    }
    # under FSDP2 the full weights are gathered by every rank together (a collective), then rank 0 writes them
    state_dict = full_state_dict(trainer.model)
    target = out_dir / MODEL_DIR
    if main_process:
        save_model_atomically(trainer.model, tokenizer, target, info, state_dict, trainer.state.log_history)
    trainer.accelerator.wait_for_everyone()
    return target


DROPPED_REFERENCE_FILE = "dropped_reference.parquet"


def run_train(stage: StageRun) -> dict[str, Artifact]:
    """Stage entry: train on ``filtered`` (+ ``reference`` for MPO) into ``checkpoint`` (``model/``), resuming
    from the latest checkpoint in ``checkpoints/`` when the runner resumes an interrupted run.

    Pairs of held-out prompts (``eval`` split of ``translated``) are left out. For MPO, the drop rule
    (``reference.drop_unsafe_pairs``) and then the premise guard (``reference.min_safe_share``) of
    :mod:`mpo_core.method.premise` run first. The model trained is the ``aligned`` checkpoint when align ran."""
    config, inputs = stage.config, stage.inputs
    pairs = training_split(inputs.table("filtered"), inputs.table_or_none("translated"))
    if pairs.num_rows == 0:
        raise InputDataError(f"{inputs.path('filtered')}: no pairs of train-split prompts to train on")
    reference = None
    info: dict[str, Any] = {"inputs": stage.input_hashes, "pairs": pairs.num_rows}
    if config.train.loss == "mpo":
        if "reference" not in inputs:
            raise InputDataError("train.loss=mpo needs the 'reference' artifact")
        check_reference_encoding(inputs.path("reference"), config)
        reference = inputs.table("reference")
        if config.reference.drop_unsafe_pairs:
            pairs, dropped = split_by_reference_gap(pairs, reference)
            stage.write(DROPPED_REFERENCE_FILE, dropped, "dropped")
            info["dropped_reference_gap_not_positive"] = len(dropped)
        info["premise"] = check_premise(pairs, reference, config.reference.min_safe_share)
    fit(config, stage.model, pairs, reference, stage.out_dir, info)
    return {}

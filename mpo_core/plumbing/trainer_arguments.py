"""A recipe's ``trainer_args``: ``transformers.TrainingArguments`` / TRL config fields passed to the trainer.

``train.trainer_args`` (and ``align.trainer_args``) override mpo's defaults for any field of the arguments
class the loss trains with (:func:`arguments_class`: ``TrainingArguments`` for mpo/simpo, TRL's ``SFTConfig``
for sft, ``DPOConfig`` for dpo/ipo): weight decay, optimizer, max grad norm, ``report_to``... The fields mpo
sets from its own keys (:data:`SECTION_ARGUMENTS`) or must own for resuming, sharding and its collator
(:data:`MPO_ARGUMENTS`) are refused. :func:`trainer_args_errors` checks a mapping at config load by building
the arguments object with its devices left alone (no accelerator state, no process group), importing
transformers/TRL only then.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic.errors import PydanticSchemaGenerationError

# Field -> the key of the ``train``/``align`` section that sets it.
SECTION_ARGUMENTS: dict[str, str] = {
    "per_device_train_batch_size": "per_device_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "learning_rate": "learning_rate",
    "num_train_epochs": "num_epochs",
    "max_steps": "max_steps",
    "lr_scheduler_type": "lr_scheduler",
    "warmup_steps": "warmup_ratio",
    "warmup_ratio": "warmup_ratio",
    "bf16": "bf16",
    "gradient_checkpointing": "gradient_checkpointing",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
    "save_total_limit": "save_total_limit",
    "beta": "beta",
    "loss_type": "loss",
    "loss_weights": "sft_weight",
    "max_length": "max_length",
}
# Field -> why mpo sets it whatever the section says.
MPO_ARGUMENTS: dict[str, str] = {
    "output_dir": "the stage's checkpoints folder",
    "seed": "train.seed / run.seed",
    "data_seed": "train.seed / run.seed",
    "save_strategy": "step checkpoints, for resuming",
    "use_cpu": "model.device",
    "remove_unused_columns": "the collator reads every column",
    "fsdp": "train.sharding",
    "fsdp_config": "train.sharding",
    "completion_only_loss": "sft trains on the chosen answers only",
}
OWNED_ARGUMENTS = SECTION_ARGUMENTS.keys() | MPO_ARGUMENTS.keys()


def owner(key: str, section: str, section_keys: set[str]) -> str:
    """Who sets the owned field ``key`` in section ``section`` (whose keys are ``section_keys``)."""
    if key in MPO_ARGUMENTS:
        return f"mpo ({MPO_ARGUMENTS[key]})"
    mpo_key = SECTION_ARGUMENTS[key]
    return f"{section}.{mpo_key}" if mpo_key in section_keys else f"the {section} stage itself"


def arguments_class(loss: str) -> type:
    """The arguments dataclass of the trainer that trains ``loss``."""
    if loss in ("mpo", "simpo"):
        from transformers import TrainingArguments

        return TrainingArguments
    if loss == "sft":
        from trl import SFTConfig

        return SFTConfig
    from trl import DPOConfig

    return DPOConfig


def _built_without_devices(cls: type, kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)`` checked by its own ``__post_init__``, with the device already answered (CPU), so that
    building it sets up no accelerator state and joins no process group (a launched training does that)."""
    import torch

    arguments = cls.__new__(cls)
    arguments.__dict__.update(_setup_devices=torch.device("cpu"), _n_gpu=0, distributed_state=None)
    arguments.__init__(**kwargs)
    return arguments


def _type_error(hint: Any, value: Any) -> str | None:
    """Why ``value`` does not fit the field type ``hint`` (strict: no str -> number), or None."""
    try:
        adapter = TypeAdapter(hint)
    except PydanticSchemaGenerationError:  # a field typed by a class pydantic cannot check: the build will
        return None
    try:
        adapter.validate_python(value, strict=True)
    except ValidationError as err:
        return "; ".join(e["msg"] for e in err.errors())
    return None


def trainer_args_errors(
    loss: str, trainer_args: dict[str, Any], section: str = "train", section_keys: set[str] = frozenset()
) -> list[tuple[str | None, str]]:
    """``(key, why)`` for every key of ``trainer_args`` that is owned by mpo, not a field of the arguments
    class of ``loss``, or of the wrong type; else the one error of building the object (its key None when
    several were given); [] when the arguments build."""
    cls = arguments_class(loss)
    name = f"{cls.__module__.split('.')[0]}.{cls.__name__}"
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    errors: list[tuple[str | None, str]] = []
    for key, value in trainer_args.items():
        if key in OWNED_ARGUMENTS:
            errors.append((key, f"set by {owner(key, section, section_keys)}, not through trainer_args"))
        elif key not in fields:
            errors.append((key, f"not a field of {name} (the arguments of loss {loss!r})"))
        elif (why := _type_error(hints.get(key, Any), value)) is not None:
            errors.append((key, why))
    if errors:
        return errors
    try:
        _built_without_devices(cls, {"output_dir": "checkpoints", "use_cpu": True, **trainer_args})
    except (ValueError, TypeError, KeyError) as err:
        only_key = next(iter(trainer_args)) if len(trainer_args) == 1 else None
        errors.append((only_key, f"{name} refuses it: {err}"))
    return errors

"""FSDP2 for the project's trainers: the arguments that turn it on, FSDP on CPU processes (gloo), fp32
gradient reduction under mixed precision, gathering the full weights, and a report of the layout.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from mpo_core.plumbing.config import TrainConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel



def sharding_arguments(cfg: TrainConfig) -> dict[str, Any]:
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

"""MPO under FSDP2 (``torch.distributed.fsdp.fully_shard``, what accelerate applies with ``fsdp_version: 2``):
two CPU processes (gloo), each holding half of every parameter and one pair, reach the gradient of one
process holding the whole model and both pairs. The root's parameters (embeddings = tied LM head, final
norm) are used by the chunked LM head outside the backbone; they must be gathered for it and their
gradients reduce-scattered like every other. A ``gpu`` variant checks fp32 master weights with bf16
compute (MixedPrecisionPolicy) on CUDA."""

from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mpo_core.method.objective import mpo_backward_step, side
from mpo_core.method.reference import reference_outputs
from mpo_core.method.synthetic import SIZES, synthetic_causal_lm, synthetic_mpo_batch

WORLD = 2
BETA = 1.5
VOCAB, HIDDEN = SIZES["tiny"]["vocab_size"], SIZES["tiny"]["hidden_size"]


def _policy_and_batch(rows: list[int]) -> tuple[torch.nn.Module, dict]:
    """A random tiny Llama in float64, a moved policy (so that L2 is not zero), and the pairs ``rows`` of
    a fixed random batch with the unmoved model's reference values."""
    reference = synthetic_causal_lm(dtype=torch.float64).eval()
    policy = copy.deepcopy(reference).train()
    with torch.no_grad():
        weight = policy.model.layers[1].mlp.up_proj.weight
        weight.add_(1e-2 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1), dtype=weight.dtype))
    whole = synthetic_mpo_batch(WORLD, 12, 16, VOCAB, HIDDEN, seed=3)
    keep = torch.tensor(rows)
    batch = {"target_lang": [whole["target_lang"][i] for i in rows]}
    for name in ("target", "dominant"):
        for key in ("input_ids", "attention_mask", "response_mask"):
            both = whole[f"{name}_{key}"]
            batch[f"{name}_{key}"] = torch.cat([both[:WORLD][keep], both[WORLD:][keep]])
    with torch.no_grad():
        ref = reference_outputs(reference, side(batch, "dominant"))
    batch["ref_gap"], batch["ref_pooled"] = ref["reward_gap"], ref["pooled"]
    return policy, batch


def _shard(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    return fully_shard(model, **kwargs)


def _sharded_step(rank: int, out_dir: Path, reshard_root: bool) -> None:
    from safetensors.torch import save_file

    policy, batch = _policy_and_batch([rank])
    sharded = _shard(policy, reshard_after_forward=True if reshard_root else None)
    _, metrics, _ = mpo_backward_step(sharded, batch, BETA, 1.0)
    grads = {name: p.grad.full_tensor().contiguous() for name, p in sharded.named_parameters()}
    grads["l1"] = metrics["l1"].reshape(1)
    save_file(grads, str(out_dir / f"rank{rank}.safetensors"))


def _rank(rank: int, init_file: str, out_dir: Path, reshard_root: bool) -> None:
    """The sharded model (its device mesh holds the process group) is freed and collected before the group
    is destroyed: left to the interpreter's exit, gloo's worker thread frees its last all-gather's tensors
    after Python finalisation has begun and the process aborts (``terminate called without an active
    exception``, about one run in seven here)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _sharded_step(rank, out_dir, reshard_root)
    finally:
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("reshard_root", [False, True], ids=["root-kept", "root-resharded"])
def test_fully_sharded_mpo_step_equals_the_whole_batch_gradient(tmp_path, reshard_root):
    from safetensors.torch import load_file

    mp.spawn(_rank, args=(str(tmp_path / "init"), tmp_path, reshard_root), nprocs=WORLD, join=True)
    policy, batch = _policy_and_batch(list(range(WORLD)))
    _, metrics, _ = mpo_backward_step(policy, batch, BETA, 1.0)
    assert metrics["l2"] > 0
    whole = {name: p.grad for name, p in policy.named_parameters()}
    singles = [_policy_and_batch([rank]) for rank in range(WORLD)]
    single_l1 = [float(mpo_backward_step(p, b, BETA, 1.0)[1]["l1"]) for p, b in singles]
    for rank in range(WORLD):
        ranked = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert float(ranked.pop("l1")) == pytest.approx(single_l1[rank], rel=1e-10)
        assert ranked.keys() == whole.keys()
        for name, grad in whole.items():
            difference = (ranked[name] - grad).norm() / grad.norm().clamp_min(1e-300)
            assert difference < 1e-8, (rank, name, float(difference))


@pytest.mark.gpu
def test_fully_sharded_bf16_compute_with_fp32_master_weights(check_device, tmp_path):
    """One process, FSDP2 with MixedPrecisionPolicy(bf16 params, fp32 reduce): the sharded parameters
    stay float32, the step is finite, and the gradients are close to the unsharded fp32 step's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dist.init_process_group(
        "nccl" if check_device == "cuda" else "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
        world_size=1,
    )
    try:
        policy, batch = _policy_and_batch([0, 1])
        policy = policy.float().to(check_device)
        batch = {k: v.to(check_device) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch["ref_gap"], batch["ref_pooled"] = batch["ref_gap"].float(), batch["ref_pooled"].float()
        plain = copy.deepcopy(policy)
        mpo_backward_step(plain, batch, BETA, 1.0)
        mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        sharded = _shard(policy, mp_policy=mixed)
        _, metrics, _ = mpo_backward_step(sharded, batch, BETA, 1.0)
        assert torch.isfinite(metrics["l1"]) and torch.isfinite(metrics["l2"])
        for (name, p), (_, q) in zip(sharded.named_parameters(), plain.named_parameters()):
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
            difference = (p.grad.full_tensor() - q.grad).norm() / q.grad.norm().clamp_min(1e-12)
            assert difference < 0.1, (name, float(difference))
    finally:
        dist.destroy_process_group()

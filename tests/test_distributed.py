"""Data-parallel MPO on CPU: two processes (gloo) under DistributedDataParallel, one real pair each, reach
the gradient of one process with both pairs; the L2 pass stays local and one all-reduce averages the sum."""

from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from core_pairs import official_pairs

from mpo_core.method.objective import mpo_backward_step, side
from mpo_core.method.reference import reference_outputs
from mpo_core.plumbing.config import ModelConfig
from mpo_core.training.examples import MPOCollator, build_examples

WORLD = 2
BETA = 1.5
COMPARED = (  # the tied embedding / LM head, the moved layer, both ends of the stack, the final norm
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.2.mlp.up_proj.weight",
    "model.layers.3.mlp.down_proj.weight",
    "model.norm.weight",
)


def _policy_and_batch(shared_data: Path, rows: list[int]) -> tuple[torch.nn.Module, dict]:
    """The real model cut to 4 layers in float64, a slightly moved policy (so that L2 is not zero), and the
    collated batch of pairs ``rows`` with the unmoved model's reference values, as every rank builds them."""
    from mpo_core.common.models import load_model, load_tokenizer

    config = ModelConfig(device="cpu", dtype="float32")
    tok = load_tokenizer(config, padding_side="right")
    reference = load_model(config).eval()
    reference.model.layers = reference.model.layers[:4]
    reference.config.num_hidden_layers = 4
    reference = reference.double()
    policy = copy.deepcopy(reference).train()
    torch.manual_seed(0)
    with torch.no_grad():
        weight = policy.model.layers[2].mlp.up_proj.weight
        weight.add_(1e-3 * torch.randn_like(weight))
    pairs = official_pairs(shared_data, WORLD, step=13).take(rows)
    batch = MPOCollator(tok.pad_token_id)(build_examples(tok, pairs, None, 48))
    with torch.no_grad():
        ref = reference_outputs(reference, side(batch, "dominant"))
    batch["ref_gap"], batch["ref_pooled"] = ref["reward_gap"], ref["pooled"]
    return policy, batch


def _data_parallel_step(rank: int, shared_data: Path, out_dir: Path) -> None:
    from safetensors.torch import save_file

    policy, batch = _policy_and_batch(shared_data, [rank])
    ddp = torch.nn.parallel.DistributedDataParallel(policy)
    mpo_backward_step(ddp, batch, BETA, 1.0)
    grads = {name: p.grad.contiguous() for name, p in policy.named_parameters() if name in COMPARED}
    save_file(grads, str(out_dir / f"rank{rank}.safetensors"))


def _rank(rank: int, init_file: str, shared_data: Path, out_dir: Path) -> None:
    """The model is freed before the gloo group is destroyed (see tests/test_sharded.py's ``_rank``)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _data_parallel_step(rank, shared_data, out_dir)
    finally:
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_mpo_step_averages_to_the_whole_batch_gradient(shared_data, tmp_path):
    from safetensors.torch import load_file

    mp.spawn(_rank, args=(str(tmp_path / "init"), shared_data, tmp_path), nprocs=WORLD, join=True)
    policy, batch = _policy_and_batch(shared_data, list(range(WORLD)))
    _, metrics, _ = mpo_backward_step(policy, batch, BETA, 1.0)
    assert metrics["l2"] > 0
    whole = {name: p.grad for name, p in policy.named_parameters() if name in COMPARED}
    assert len(whole) == len(COMPARED)
    for rank in range(WORLD):
        ranked = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert ranked.keys() == whole.keys()
        for name, grad in whole.items():
            difference = (ranked[name] - grad).norm() / grad.norm().clamp_min(1e-300)
            assert difference < 1e-5, (rank, name, float(difference))

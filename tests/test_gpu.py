"""Checks for a CUDA GPU (marked ``gpu``; ``scripts/gpu-check.sh`` runs them, ``--cpu-smoke`` on the CPU):
the packed pair forward against the plain forward with the GPU attention kernels, and a bf16 MPO step on a
random-weight Llama. No download: the models come from :mod:`mpo_core.method.synthetic`."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mpo_core.method.objective import mpo_backward_step
from mpo_core.method.packed import final_hidden_states, paired_final_hidden_states
from mpo_core.method.synthetic import SIZES, random_pairs, synthetic_causal_lm, synthetic_mpo_batch

pytestmark = pytest.mark.gpu


def _attention_cases(device: str) -> list[tuple[str, torch.dtype, float]]:
    cases = [("sdpa", torch.float32, 1e-4), ("sdpa", torch.bfloat16, 3e-2)]
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        cases.append(("flash_attention_2", torch.bfloat16, 3e-2))
    return cases


def test_packed_pair_forward_equals_plain_forward(check_device):
    """Each pair's prompt run once behind a 4D mask gives the states of the plain forward, with every
    attention kernel present (flash attention takes no 4D mask: it runs the plain forward)."""
    from mpo_core.method.encoding import collate_pairs

    pairs = random_pairs(4, prompt_len=40, response_len=60, vocab=512, generator=torch.Generator().manual_seed(1))
    batch = {k: v.to(check_device) for k, v in collate_pairs(pairs, 0).items()}
    real = batch["attention_mask"].bool()
    for attention, dtype, tolerance in _attention_cases(check_device):
        model = synthetic_causal_lm(attn_implementation=attention, dtype=dtype, device=check_device).eval()
        with torch.no_grad():
            packed = paired_final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
            plain = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        error = (packed[real] - plain[real]).float().norm() / plain[real].float().norm()
        assert error < tolerance, (attention, dtype, float(error))


def test_bf16_mpo_step_is_finite_and_decreases_l1(check_device):
    """fp32 master weights, bf16 autocast compute: on a fixed batch, L1 is finite and goes down."""
    model = synthetic_causal_lm(device=check_device).train()
    batch = synthetic_mpo_batch(4, 24, 32, SIZES["tiny"]["vocab_size"], SIZES["tiny"]["hidden_size"],
                                device=check_device)
    batch["ref_gap"] = batch["ref_gap"].abs() + 0.5  # a safe reference: positive dominant gaps
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    l1 = []
    for _ in range(6):
        _, metrics, _ = mpo_backward_step(
            model, batch, 1.0, 1.0, forward_context=lambda: torch.autocast(check_device, dtype=torch.bfloat16)
        )
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        l1.append(float(metrics["l1"]))
    assert all(torch.isfinite(torch.tensor(l1))) and l1[-1] < 0.5 * l1[0], l1
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32

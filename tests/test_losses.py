"""The MPO loss, SimPO and the reference formulas of the TRL baselines against hand-computed values (the
equations of the README's method section)."""

from __future__ import annotations

import math

import pytest
import torch
from reference_losses import dpo_margin, dpo_sigmoid_loss, ipo_loss

from mpo_core.method.losses import masked_mean_pool, mpo_loss, reward_gap, simpo_loss


def _inputs(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    values = {
        "policy_target_chosen_avg_logps": [-1.0, -2.0],
        "policy_target_rejected_avg_logps": [-3.0, -1.0],
        "ref_dominant_reward_gap": [1.5, -0.5],
        "policy_dominant_pooled": [[1.0, 2.0], [3.0, 4.0], [0.0, 1.0], [2.0, 2.0]],
        "ref_dominant_pooled": [[1.0, 1.0], [2.0, 4.0], [0.0, 0.0], [2.0, 0.0]],
    }
    return {k: torch.tensor(v, requires_grad=requires_grad) for k, v in values.items()}


def test_mpo_loss_matches_hand_computation():
    loss, metrics = mpo_loss(**_inputs(), beta=1.5, lam=0.5)
    # RG^t = [2, -1]; L1 = mean((1.5*2 - 1.5)^2, (1.5*-1 + 0.5)^2) = mean(2.25, 1.0)
    l1 = (2.25 + 1.0) / 2
    # squared differences 0,1 | 1,0 | 0,1 | 0,4 over 8 elements
    l2 = (0 + 1 + 1 + 0 + 0 + 1 + 0 + 4) / 8
    assert metrics["l1"].item() == pytest.approx(l1)
    assert metrics["l2"].item() == pytest.approx(l2)
    assert loss.item() == pytest.approx(l1 + 0.5 * l2)
    assert metrics["target_gap"].item() == pytest.approx(0.5)
    assert metrics["dominant_gap"].item() == pytest.approx(0.5)
    assert metrics["target_gap_accuracy"].item() == pytest.approx(0.5)


def test_mpo_gradients_reach_only_policy_inputs():
    inputs = _inputs(requires_grad=True)
    beta = 1.5
    loss, _ = mpo_loss(**inputs, beta=beta, lam=1.0)
    loss.backward()
    assert inputs["ref_dominant_reward_gap"].grad is None
    assert inputs["ref_dominant_pooled"].grad is None
    # dL1/ds_w = 2 (beta*RG^t - RG^d) beta / B, dL1/ds_l = -dL1/ds_w
    residual = torch.tensor([1.5, -1.0])
    expected = 2 * residual * beta / 2
    torch.testing.assert_close(inputs["policy_target_chosen_avg_logps"].grad, expected)
    torch.testing.assert_close(inputs["policy_target_rejected_avg_logps"].grad, -expected)
    diff = inputs["policy_dominant_pooled"].detach() - inputs["ref_dominant_pooled"].detach()
    torch.testing.assert_close(inputs["policy_dominant_pooled"].grad, 2 * diff / diff.numel())


def test_masked_mean_pool_ignores_padding_length_and_values():
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    pooled = masked_mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, :2].mean(0))
    padded = torch.cat([hidden, torch.full((2, 5, 4), float("nan"))], dim=1)
    padded[1, 2] = float("inf")
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    torch.testing.assert_close(masked_mean_pool(padded, padded_mask), pooled)
    assert torch.equal(masked_mean_pool(hidden, torch.zeros(2, 3)), torch.zeros(2, 4))


def test_mpo_loss_is_unchanged_by_padding_in_pooled_states():
    hidden = torch.randn(4, 5, 3)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0], [1] * 2 + [0] * 3])
    ref = torch.randn(4, 3)
    logps = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -0.5]), torch.tensor([0.3, 0.1])
    base, _ = mpo_loss(*logps, masked_mean_pool(hidden, mask), ref, beta=1.0)
    garbage = torch.where(mask.bool().unsqueeze(-1), hidden, torch.full_like(hidden, 1e6))
    longer = torch.cat([garbage, torch.full((4, 7, 3), -3.0)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(4, 7, dtype=torch.long)], dim=1)
    padded, _ = mpo_loss(*logps, masked_mean_pool(longer, longer_mask), ref, beta=1.0)
    assert padded.item() == pytest.approx(base.item(), rel=1e-6)


def test_baseline_losses_match_hand_computation():
    pc, pr = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -9.0])
    rc, rr = torch.tensor([-10.5, -12.0]), torch.tensor([-10.0, -10.0])
    margins = [(-10 + 10.5) - (-11 + 10), (-12 + 12) - (-9 + 10)]  # [1.5, -1.0]
    beta = 0.1
    dpo = sum(-math.log(1 / (1 + math.exp(-beta * m))) for m in margins) / 2
    margin = dpo_margin(pc, pr, rc, rr)
    assert margin.tolist() == pytest.approx(margins)
    assert dpo_sigmoid_loss(margin, beta).item() == pytest.approx(dpo, rel=1e-6)
    ipo = sum((m - 1 / (2 * beta)) ** 2 for m in margins) / 2
    assert ipo_loss(margin, beta).item() == pytest.approx(ipo, rel=1e-6)
    gap = reward_gap(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]))  # [0.5, -1.0]
    simpo = sum(-math.log(1 / (1 + math.exp(-(2.0 * g - 0.5)))) for g in gap.tolist()) / 2
    assert simpo_loss(
        torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), 2.0, 0.5
    ).item() == pytest.approx(simpo)

"""Independent reference formulas of the baselines that train through TRL (DPO sigmoid, IPO): the tests
check TRL's logged losses against them; nothing in ``mpo_core`` computes these losses itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """The DPO log-ratio margin ``(log pi_w - log ref_w) - (log pi_l - log ref_l)`` per pair."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def dpo_sigmoid_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO: ``-mean log sigmoid(beta * margin)`` with :func:`dpo_margin` of summed log-probabilities."""
    return -F.logsigmoid(beta * margin).mean()


def ipo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: ``mean (margin - 1/(2 beta))^2`` with :func:`dpo_margin` (TRL uses average log-probabilities)."""
    return ((margin - 1.0 / (2.0 * beta)) ** 2).mean()

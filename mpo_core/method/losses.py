"""The MPO equations as plain tensor functions (README, "The method"; Zhao et al., ACL 2025, arXiv 2505.16869).

Notation: ``s(y|x) = (1/|y|) sum_i log pi(y_i | x, y_<i)`` is the length-normalised
log-likelihood of a response over its response tokens; the reward gap of a pair is
``RG = s(y_w|x) - s(y_l|x)`` (no reference log-ratio).

MPO, its three equations:

- the reward-gap objective ``L1 = mean_b (beta * RG^t_b - RG^d_b)^2``, with ``RG^t`` from the policy on
  the target-language pair and ``RG^d`` from the frozen reference on the dominant-language pair (a constant:
  precomputed once);
- the dominant-language representation constraint ``L2 = mean((h_policy - h_ref)^2)`` over the final-layer
  hidden states of the dominant chosen and rejected sequences, each mean-pooled over its real tokens
  (:func:`masked_mean_pool`). Deviation from the official code, which pools padding positions too: we
  exclude padding, so the loss cannot depend on how a batch was padded;
- the total loss ``L = L1 + lam * L2`` (the paper: ``lam = 1``).

SimPO (``-mean log sigmoid(beta * RG - gamma)``) is here because the train stage's own trainer runs it; the
DPO, IPO and SFT baselines train through TRL. Every function here takes tensors and knows nothing of models
or tokenisers; :mod:`mpo_core.method.objective` applies them to a model and a batch, as training does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``pooled_b = sum_t m_bt h_bt / sum_t m_bt`` for ``hidden [B, T, H]``, ``attention_mask [B, T]``.

    Padding positions are excluded by selection (not multiplication), so even NaN or inf values there
    cannot leak into the result. A row with no real token pools to zeros.
    """
    mask = attention_mask.bool().unsqueeze(-1)
    summed = torch.where(mask, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(dim=1)
    counts = mask.sum(dim=1).clamp_min(1).to(hidden.dtype)
    return summed / counts


def reward_gap(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """``RG = s(y_w|x) - s(y_l|x)``, elementwise over the batch."""
    return chosen_avg_logps - rejected_avg_logps


def mpo_l1_terms(target_gap: torch.Tensor, dominant_gap: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair L1 terms ``(beta * RG^t_b - RG^d_b)^2`` (L1 is their mean); ``RG^d`` is a constant."""
    return (beta * target_gap - dominant_gap.detach().to(target_gap.dtype)) ** 2


def mpo_l2(policy_dominant_pooled: torch.Tensor, ref_dominant_pooled: torch.Tensor) -> torch.Tensor:
    """``L2 = mean((h_policy - h_ref)^2)`` over the pooled states; the reference states are constants."""
    return F.mse_loss(policy_dominant_pooled, ref_dominant_pooled.detach().to(policy_dominant_pooled.dtype))


def mpo_metrics(
    target_gap: torch.Tensor, dominant_gap: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Detached MPO metrics: ``l1``, ``l2``, ``target_gap`` (mean RG^t), ``dominant_gap`` (mean RG^d),
    ``target_gap_accuracy`` (fraction of pairs with RG^t > 0)."""
    target_gap = target_gap.detach()
    return {
        "l1": l1.detach(),
        "l2": l2.detach(),
        "target_gap": target_gap.mean(),
        "dominant_gap": dominant_gap.detach().float().mean(),
        "target_gap_accuracy": (target_gap > 0).float().mean(),
    }


def mpo_loss(
    policy_target_chosen_avg_logps: torch.Tensor,
    policy_target_rejected_avg_logps: torch.Tensor,
    ref_dominant_reward_gap: torch.Tensor,
    policy_dominant_pooled: torch.Tensor,
    ref_dominant_pooled: torch.Tensor,
    beta: float,
    lam: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L = mean_b (beta * RG^t_b - RG^d_b)^2 + lam * mean((h_policy - h_ref)^2)``.

    ``policy_dominant_pooled`` and ``ref_dominant_pooled`` hold the pooled states of the dominant chosen and
    rejected sequences (any matching shape, e.g. ``[2B, H]``). The reference inputs are constants: they are
    detached, so gradients reach only the policy's target log-likelihoods and its pooled states.

    Returns the loss and the detached metrics of :func:`mpo_metrics`.
    """
    target_gap = reward_gap(policy_target_chosen_avg_logps, policy_target_rejected_avg_logps)
    l1 = mpo_l1_terms(target_gap, ref_dominant_reward_gap, beta).mean()
    l2 = mpo_l2(policy_dominant_pooled, ref_dominant_pooled)
    return l1 + lam * l2, mpo_metrics(target_gap, ref_dominant_reward_gap, l1, l2)


def simpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """SimPO (reference-free): ``-mean log sigmoid(beta * (s(y_w|x) - s(y_l|x)) - gamma)``."""
    return -F.logsigmoid(beta * reward_gap(chosen_avg_logps, rejected_avg_logps) - gamma).mean()

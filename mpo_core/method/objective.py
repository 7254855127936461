"""The MPO objective as it is trained: the equations of :mod:`mpo_core.method.losses` applied to a model and
a collated batch (README, "The method"; Zhao et al., ACL 2025, arXiv 2505.16869, the MPO objective).

- :func:`mpo_backward_step` is what training runs: the total loss ``L = L1 + lambda * L2`` accumulated in
  two backward passes, ``lambda * L2`` (the dominant-language representation constraint) then ``L1`` (the
  reward-gap objective), with ``RG^d`` and the reference's pooled states read from the batch (the
  ``reference`` artifact, computed once).
- :func:`mpo_step_loss` is the same loss in one graph (evaluation, checks);
- :func:`paper_mpo_loss` is the loss as the paper's code computes it (the frozen reference inside the step,
  full-vocabulary logits, one graph): the yardstick the tests and benchmarks compare the other two with.

A batch is what :class:`mpo_core.training.examples.MPOCollator` builds: ``target_*`` and ``dominant_*`` sequences
(chosen rows first, then rejected), ``ref_gap [B]`` and ``ref_pooled [2B, H]``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from mpo_core.method.logps import full_logits_outputs, sequence_outputs
from mpo_core.method.losses import mpo_l1_terms, mpo_l2, mpo_loss, mpo_metrics, reward_gap

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def side(batch: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """The ``input_ids``/``attention_mask``/``response_mask`` of one side (``target``/``dominant``)."""
    return {key: batch[f"{name}_{key}"] for key in ("input_ids", "attention_mask", "response_mask")}


def mpo_step_loss(
    model: PreTrainedModel, batch: dict[str, Any], beta: float, lam: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """``L = L1 + lam * L2`` of one collated batch in one graph (evaluation and checks), with
    ``L1 = mean_b (beta * RG^t_b - RG^d_b)^2`` (the reward-gap term) on the policy's target-side
    gaps and ``L2 = MSE(pool(h_policy(d)), pool(h_reference(d)))`` (the dominant-language representation
    constraint), ``RG^d`` and the reference's pooled states read from the batch. Returns the loss, the
    metrics and the per-pair target gaps ``RG^t``."""
    n = batch["ref_gap"].shape[0]
    target = sequence_outputs(model, side(batch, "target"), with_pooled=False, paired=True)["avg_logps"]
    if lam > 0:
        dominant = sequence_outputs(model, side(batch, "dominant"), with_logps=False, paired=True)
        policy_pooled = dominant["pooled"]
        ref_pooled = batch["ref_pooled"]
    else:
        policy_pooled = ref_pooled = target.new_zeros(1)
    loss, metrics = mpo_loss(target[:n], target[n:], batch["ref_gap"], policy_pooled, ref_pooled, beta, lam)
    return loss, metrics, reward_gap(target[:n], target[n:]).detach()


def paper_mpo_loss(
    model: PreTrainedModel, reference: PreTrainedModel, batch: dict[str, Any], beta: float, lam: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MPO loss as the paper's code computes it, kept as the yardstick for tests and benchmarks: the
    frozen ``reference`` model runs inside the step, every sequence goes through full-vocabulary logits
    (:func:`mpo_core.method.logps.full_logits_outputs`), one graph for L1 and L2."""
    n = batch["target_input_ids"].shape[0] // 2
    with torch.no_grad():
        ref = full_logits_outputs(reference, side(batch, "dominant"))
    target = full_logits_outputs(model, side(batch, "target"))
    dominant = full_logits_outputs(model, side(batch, "dominant"))
    return mpo_loss(
        target["avg_logps"][:n],
        target["avg_logps"][n:],
        reward_gap(ref["avg_logps"][:n], ref["avg_logps"][n:]),
        dominant["pooled"],
        ref["pooled"],
        beta,
        lam,
    )


def _local_gradients(model: torch.nn.Module) -> AbstractContextManager:
    """Under DistributedDataParallel, a pass whose gradients stay local (``no_sync``): the L2 pass, so that
    the L1 pass after it averages the sum over the ranks in one all-reduce, with every parameter used."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


def mpo_backward_step(
    model: PreTrainedModel,
    batch: dict[str, Any],
    beta: float,
    lam: float,
    *,
    backward: Callable[[torch.Tensor], None] | None = None,
    scale: float = 1.0,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Accumulate ``scale * grad L`` of one batch into the parameters' ``.grad``, in two backward passes:
    the objective as training runs it (:meth:`mpo_core.training.trainer.MPOTrainer.training_step`).

    ``L = L1 + lam * L2`` with the reward-gap objective ``L1 = mean_b (beta * RG^t_b - RG^d_b)^2`` and the
    dominant-language representation constraint ``L2 = MSE(pool(h_policy(d)), pool(h_reference(d)))``
    (:mod:`mpo_core.method.losses`). L1 depends only on the target-language sequences and L2 only on the
    dominant-language ones, so ``grad L = grad L1 + lam * grad L2`` is accumulated as: dominant forward
    (backbone only), backward of ``lam * L2``; then target forward (chunked LM head on response tokens),
    backward of ``L1``. Only one side's activations are alive at a time; the gradients are those of the joint
    loss. Under DistributedDataParallel the forwards go through the wrapper and the gradients are averaged
    over the ranks once, after the L1 pass.
    Returns the detached loss, the metrics and the per-pair target gaps.
    """
    backward = backward or torch.Tensor.backward
    n = batch["ref_gap"].shape[0]
    l2 = batch["ref_gap"].new_zeros(())
    if lam > 0:
        with _local_gradients(model):
            with forward_context():
                dominant = sequence_outputs(model, side(batch, "dominant"), with_logps=False, paired=True)
                l2 = mpo_l2(dominant["pooled"], batch["ref_pooled"])
            backward(lam * scale * l2)
        del dominant
    with forward_context():
        target = sequence_outputs(model, side(batch, "target"), with_pooled=False, paired=True)["avg_logps"]
        gaps = reward_gap(target[:n], target[n:])
        l1 = mpo_l1_terms(gaps, batch["ref_gap"], beta).mean()
    backward(scale * l1)
    return (l1 + lam * l2).detach(), mpo_metrics(gaps, batch["ref_gap"], l1, l2), gaps.detach()

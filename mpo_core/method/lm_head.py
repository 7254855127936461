"""Response-token log-probabilities through the LM head, in chunks.

Only positions that predict a response token reach the head, in chunks of at most
:data:`LOGITS_CHUNK_ELEMENTS` logits, so no full-vocabulary float32 logits of the whole batch ever exist.
For a plain bias-free ``nn.Linear`` head, :class:`ChunkedTokenLogps` writes the backward by hand (each
chunk's logits recomputed and turned into their gradient in place); other heads run each chunk under
activation checkpointing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from mpo_core.method.packed import split_causal_lm

if TYPE_CHECKING:
    from transformers import PreTrainedModel


LOGITS_CHUNK_ELEMENTS = 1 << 24  # at most this many logits (64 MiB in float32) per chunk


def _softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return torch.tanh(logits / softcap) * softcap if softcap else logits


class ChunkedTokenLogps(torch.autograd.Function):
    """``log softmax(softcap(h W^T))[y]`` per row of ``h [N, H]`` for targets ``y [N]``, one chunk of rows at a
    time, never more than one chunk of logits alive.

    The matmuls run in :func:`_matmul_dtype` (autocast's dtype under autocast) in forward and backward alike,
    logits upcast to at least float32. Forward keeps only ``logsumexp`` per row. Backward recomputes each chunk's logits ``z`` and turns them in
    place into ``dL/dz = g * (onehot(y) - softmax(z))`` (times ``1 - tanh^2`` under a softcap), then
    ``dL/dh = dL/dz W`` and ``dL/dW += dL/dz^T h``: the same maths as autograd through a checkpointed chunk,
    with a few in-place passes over the logits instead of a dozen fresh tensors.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, softcap: float | None):
        compute = _matmul_dtype(hidden)
        dtype = torch.promote_types(compute, torch.float32)  # bf16/fp16 logits are upcast
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        lse = torch.empty_like(out)
        with _autocast_off(hidden):
            h, w = hidden.to(compute), weight.to(compute)
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits = _softcapped((h[rows] @ w.T).to(dtype), softcap)
                lse[rows] = torch.logsumexp(logits, dim=-1)
                out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.softcap, ctx.compute = chunk, softcap, compute
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if want_weight else None
        cap, compute = ctx.softcap, ctx.compute
        with _autocast_off(hidden):
            h, w = hidden.to(compute), weight.to(compute)
            for start in range(0, hidden.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                g = grad_out[rows].to(lse.dtype)[:, None]
                grad_logits = (h[rows] @ w.T).to(lse.dtype)
                if cap:
                    tanh = grad_logits.div_(cap).tanh_()
                    squash = 1 - tanh.square()
                    grad_logits = tanh.mul_(cap)
                grad_logits.sub_(lse[rows, None]).exp_().mul_(-g)
                grad_logits.scatter_add_(1, targets[rows, None], g)
                if cap:
                    grad_logits.mul_(squash)
                grad_logits = grad_logits.to(compute)
                if want_hidden:
                    grad_hidden[rows] = grad_logits @ w
                if want_weight:
                    grad_weight.add_(grad_logits.T @ h[rows])
        return grad_hidden, grad_weight.to(weight.dtype) if want_weight else None, None, None, None


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype ``hidden @ weight.T`` runs in here: autocast's (bf16/fp16) where autocast is on for the
    tensor's device, else the hidden states' own. Forward and backward both use it, so the backward's
    recomputed logits are the forward's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _autocast_off(hidden: torch.Tensor):
    return torch.autocast(hidden.device.type, enabled=False)


def _chunk_token_logps(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, softcap: float | None
) -> torch.Tensor:
    """One chunk through the head module itself (run under activation checkpointing when gradients are
    needed): for heads that are not a plain bias-free ``nn.Linear``, e.g. LoRA-wrapped or quantised ones."""
    logits = lm_head(hidden)
    logits = _softcapped(logits.to(torch.promote_types(logits.dtype, torch.float32)), softcap)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def response_logp_sums(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i log pi(y_i | x, y_<i), |y|)`` per row, from final hidden states, response tokens only.

    Position ``t`` predicts token ``t + 1``; only positions predicting a response token reach the LM head,
    in chunks of at most :data:`LOGITS_CHUNK_ELEMENTS` logits.
    """
    _, lm_head, softcap = split_causal_lm(model)
    predicts_response = response_mask[:, 1:]
    rows = predicts_response.nonzero(as_tuple=True)[0]
    selected = hidden[:, :-1][predicts_response]
    targets = input_ids[:, 1:][predicts_response]
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // lm_head.out_features)
    if type(lm_head) is torch.nn.Linear and lm_head.bias is None:
        token_logps = ChunkedTokenLogps.apply(selected, lm_head.weight, targets, chunk, softcap)
    else:
        recompute = torch.is_grad_enabled() and selected.requires_grad
        pieces = []
        for start in range(0, selected.shape[0], chunk):
            args = (selected[start : start + chunk], targets[start : start + chunk], lm_head, softcap)
            if recompute:
                pieces.append(checkpoint(_chunk_token_logps, *args, use_reentrant=False))
            else:
                pieces.append(_chunk_token_logps(*args))
        token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0).float()
    sums = torch.zeros(hidden.shape[0], dtype=token_logps.dtype, device=hidden.device).index_add(
        0, rows, token_logps
    )
    counts = predicts_response.sum(dim=1)
    return sums, counts

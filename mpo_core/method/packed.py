"""The backbone's forward: final hidden states without the LM head, each pair's shared prompt run once.

:func:`final_hidden_states` runs a right-padded batch as it is. :func:`paired_final_hidden_states` packs the
chosen and rejected sequence of each pair into one row (shared prompt once, each answer behind a 4D attention
mask that lets it see the prompt and itself only) and unpacks the states into the unpacked layout: the same
values and gradients for fewer tokens. Both take a ``reduce`` run on the states inside the forward (what
FSDP2 needs to gather the root's parameters once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mpo_core.common.attention import GROUPED_SDPA

if TYPE_CHECKING:
    from transformers import PreTrainedModel


Reduce = Callable[[torch.Tensor], object]  # what is computed from the final hidden states inside the forward


def unwrap_model(model: torch.nn.Module) -> PreTrainedModel:
    """The ``transformers`` model inside a DistributedDataParallel and/or peft wrapper."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def split_causal_lm(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """``(backbone, lm_head, final_logit_softcapping)`` of a causal LM, wrappers unwrapped."""
    base = unwrap_model(model)
    return base.get_decoder(), base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``, as accelerate applies it)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _last_hidden_state(model: torch.nn.Module, reduce: Reduce | None = None, **inputs: torch.Tensor):
    """The backbone's final (post-norm) hidden states for ``inputs``, without the LM head, or ``reduce`` of
    them (e.g. response log-likelihoods through the LM head).

    Under DistributedDataParallel the forward goes through the wrapper (its gradient hooks are armed only
    there), with no logits kept. Under FSDP2 it goes through the root module too, and ``reduce`` runs inside
    that forward (a forward hook placed before FSDP's own): the root's parameters (embeddings, LM head,
    final norm) are gathered there, and FSDP's pre-backward hook gathers them again before the backward of
    ``reduce`` needs them. Otherwise the backbone runs directly."""
    reduce = reduce or (lambda hidden: hidden)
    sharded = is_fully_sharded(model)
    if not sharded and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        backbone, _, _ = split_causal_lm(model)
        return reduce(backbone(**inputs, use_cache=False).last_hidden_state)
    no_logits = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    if not sharded:
        out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=no_logits)
        return reduce(out.hidden_states[-1])

    def reduce_inside(module, args, kwargs, output):
        # in the ``logits`` field (none were computed): FSDP hooks the tensors of the output's dataclass fields
        output.logits = reduce(output.hidden_states[-1])
        return output

    handle = model.register_forward_hook(reduce_inside, with_kwargs=True, prepend=True)
    try:
        return model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=no_logits).logits
    finally:
        handle.remove()


def final_hidden_states(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, reduce: Reduce | None = None
):
    """The backbone's final (post-norm) hidden states ``[B, T, H]``: the LM head's input, no logits (or
    ``reduce`` of them, see :func:`_last_hidden_state`)."""
    return _last_hidden_state(model, reduce, input_ids=input_ids, attention_mask=attention_mask)


def pair_prefix_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per pair (rows ``b`` and ``b + n`` of a right-padded ``[2n, T]`` batch), the number of leading tokens
    the two sequences share, capped so that each sequence keeps at least one token of its own."""
    n = input_ids.shape[0] // 2
    real = attention_mask.bool()
    lengths = real.sum(dim=1)
    same = (input_ids[:n] == input_ids[n:]) & real[:n] & real[n:]
    common = same.long().cumprod(dim=1).sum(dim=1)
    return torch.minimum(common, torch.minimum(lengths[:n], lengths[n:]) - 1).clamp_min(0)


BOOLEAN_MASK_ATTENTION = ("sdpa", GROUPED_SDPA)  # take a boolean 4D mask (True = attend)
PACKABLE_ATTENTION = (*BOOLEAN_MASK_ATTENTION, "eager")  # the implementations that take an arbitrary 4D mask


def binding_sliding_window(config, longest: int) -> int | None:
    """The model's sliding attention window where some layer uses one and a sequence of ``longest`` tokens
    exceeds it (else ``None``: the window never hides a token and every layer sees the plain causal mask)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    slides = "sliding_attention" in layer_types or (window is not None and not layer_types)
    return window if slides and window is not None and longest > window else None


def takes_mask_mapping(config) -> bool:
    """Whether the model reads a ready ``{layer type: 4D mask}`` mapping, one mask per attention kind
    (transformers' models that declare ``layer_types``, e.g. Gemma-2, Qwen2, Qwen3)."""
    return bool(getattr(config, "layer_types", None))


def _pair_attention_mask(
    segments: torch.Tensor,
    implementation: str,
    dtype: torch.dtype,
    *,
    positions: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """``[n, 1, W, W]`` mask of packed pairs from per-position segments (0 prefix, 1 chosen's own tokens,
    2 rejected's own tokens, 3 padding): causal, and a token sees the prefix and its own segment; padding
    sees only itself. With a sliding ``window``, a token at true position ``p`` (``positions``) sees only
    keys at positions ``> p - window``, as the model's own sliding mask does. Boolean (True = attend) for
    SDPA, additive float for eager attention."""
    width = segments.shape[1]
    steps = torch.arange(width, device=segments.device)
    causal = steps[:, None] >= steps[None, :]
    query, key = segments[:, :, None], segments[:, None, :]
    visible = causal & (query < 3) & ((key == 0) | (key == query))
    if window is not None:
        visible = visible & (positions[:, :, None] - positions[:, None, :] < window)
    visible = (visible | torch.eye(width, dtype=torch.bool, device=segments.device))[:, None]
    if implementation in BOOLEAN_MASK_ATTENTION:
        return visible
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=segments.device)
    return torch.where(visible, torch.zeros((), dtype=dtype, device=segments.device), blocked)


def paired_final_hidden_states(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, reduce: Reduce | None = None
):
    """:func:`final_hidden_states` of a ``[2n, T]`` batch whose rows ``b`` and ``b + n`` are the chosen and
    rejected sequence of one pair, running their shared prefix (the prompt) once.

    A causal model's hidden state at position ``t`` depends on tokens ``<= t`` only, so the ``L_b`` tokens
    both sequences of pair ``b`` share have the same states in both. Each pair is packed into one row,
    ``prefix + chosen's own tokens + rejected's own tokens``, with true position ids and a 4D attention mask
    in which each answer sees the prefix and itself only; one forward of ``n`` packed rows replaces ``2n``
    rows, and the states are unpacked into the right-padded ``[2n, T, H]`` layout. Gradients are those of
    the unshared forward: each prefix token receives the sum of both answers' gradients. Under a sliding
    window that a sequence exceeds (Gemma-2), the sliding layers get their own windowed mask; the plain
    forward runs instead when some pair shares nothing, the attention implementation takes no 4D mask, or
    a binding window cannot be given to the model as a mask per layer type.
    """
    base = unwrap_model(model)
    implementation = getattr(base.config, "_attn_implementation", None)
    prefix = pair_prefix_lengths(input_ids, attention_mask)
    longest = int(attention_mask.sum(dim=1).max()) if prefix.numel() else 0
    window = binding_sliding_window(base.config, longest)
    if (
        prefix.numel() == 0
        or int(prefix.min()) < 1
        or implementation not in PACKABLE_ATTENTION
        or (window is not None and not takes_mask_mapping(base.config))
    ):
        return final_hidden_states(model, input_ids, attention_mask, reduce)
    n, total = prefix.shape[0], input_ids.shape[1]
    device = input_ids.device
    lengths = attention_mask.sum(dim=1)
    pair = torch.arange(n, device=device)[:, None]
    start = prefix[:, None]
    chosen_end = lengths[:n][:, None]  # packed row: [0, chosen_end) is the chosen sequence, then
    packed_end = chosen_end + lengths[n:][:, None] - start  # the rejected sequence's own tokens
    steps = torch.arange(int(packed_end.max()), device=device)[None, :]
    real = steps < packed_end
    in_rejected = (steps >= chosen_end) & real
    source_row = torch.where(in_rejected, pair + n, pair)
    source_col = torch.where(in_rejected, steps - chosen_end + start, torch.where(real, steps, 0))
    segments = torch.where(steps < start, 0, torch.where(steps < chosen_end, 1, torch.where(real, 2, 3)))
    mask = _pair_attention_mask(segments, implementation, base.dtype)
    if window is not None:
        windowed = _pair_attention_mask(
            segments, implementation, base.dtype, positions=source_col, window=window
        )
        mask = {"full_attention": mask, "sliding_attention": windowed}
    positions = torch.arange(total, device=device)[None, :]
    rejected_cols = torch.where(positions < start, positions, positions - start + chosen_end)
    columns = torch.cat([positions.expand(n, total), rejected_cols]).clamp_max(int(packed_end.max()) - 1)
    unpack = lambda packed: packed[pair.repeat(2, 1), columns]
    return _last_hidden_state(
        model,
        (lambda packed: reduce(unpack(packed))) if reduce else unpack,
        input_ids=input_ids[source_row, source_col],
        attention_mask=mask,
        position_ids=source_col,
    )

"""Grouped-query attention without key/value copies at inference on CPU.

With a mask (any padded batch), transformers' ``sdpa`` attention copies each key/value head once per query
head of its group (``repeat_kv``), as CUDA's kernels need. torch's CPU kernel takes the grouped heads and the
mask as they are (``enable_gqa=True``) and gives the same values bit for bit, without the copies: at decoding
they cost more than the attention itself. :data:`GROUPED_SDPA` is ``sdpa`` with that change, registered with
transformers' attention and mask interfaces; :func:`mpo_core.common.models.load_model` gives it to CPU models.
Where gradients are on (training), on another device, or for a call it does not cover, it is transformers'
``sdpa`` unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

GROUPED_SDPA = "mpo_grouped_sdpa"


def grouped_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward``; for a masked, grouped, gradient-free call on CPU the
    ``[batch, kv_heads, length, dim]`` keys and values go to the kernel without being repeated."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (
        query.device.type != "cpu" or torch.is_grad_enabled() or attention_mask is None or dropout
        or key.shape[1] == query.shape[1] or any(kwargs.get(k) is not None for k in ("position_bias", "cache"))
        or kwargs.get("output_attentions")
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


def register_grouped_sdpa() -> str:
    """Register :data:`GROUPED_SDPA` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    return GROUPED_SDPA

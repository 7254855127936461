"""TRL's DPO with each pair's chosen and rejected sequence packed into one row: no padding, prompt run once;
and its LM head on the answers' tokens only.

TRL's ``DPOTrainer`` runs a ``[2n, T]`` batch (rows ``b`` and ``b + n``: the chosen and rejected sequence of
pair ``b``, both ``prompt + answer``, right-padded to the longest of all ``2n``) through the backbone and
reads per-token log-probabilities from its final hidden states. :func:`packed_pair_backbone` makes that
backbone call run :func:`mpo_core.method.packed.paired_final_hidden_states` instead: one row per pair, the
shared prompt once, each answer behind a 4D mask that shows it the prompt and itself, padded only to the
longest packed row; the states come back in TRL's ``[2n, T, H]`` layout. Values and gradients are those
of the padded forward up to floating-point rounding (other matrix shapes sum in another order): a result
may differ in the last bits, not more. TRL's own ``padding_free`` is disabled in TRL 1.x.

TRL's fused LM head (``add_fused_lm_head``) projects, in vocabulary tiles, only the positions with a label on
Triton devices, and every position elsewhere (fixed tile shapes for compiling backends); on CPU that is the
prompts and the padding too, most of a DPO row. :func:`labelled_positions_only` makes it take its own
labelled-only path on CPU as well (the log-probabilities of the labelled positions are the same, up to the
rounding of other matrix shapes; the others are 0 either way).

The plain forward runs where packing cannot apply (a model sharded or wrapped for several processes, an
attention implementation without 4D masks, a pair sharing no prefix: see ``paired_final_hidden_states``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from mpo_core.method.packed import paired_final_hidden_states, split_causal_lm


@contextlib.contextmanager
def packed_pair_backbone(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, a call of ``model``'s backbone on a right-padded ``[2n, T]`` batch of pairs (TRL's
    DPO layout) runs packed (:func:`paired_final_hidden_states`); other calls run as they are."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or torch.distributed.is_initialized():
        yield
        return
    backbone, _, _ = split_causal_lm(model)
    original = backbone.forward
    inside = []

    def forward(*args: Any, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any):
        plain = (
            inside or args or input_ids is None or attention_mask is None or attention_mask.dim() != 2
            or input_ids.shape[0] % 2 or set(kwargs) - {"use_cache"}
        )
        if plain:
            return original(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        inside.append(True)
        try:
            hidden = paired_final_hidden_states(model, input_ids, attention_mask)
        finally:
            inside.pop()
        return BaseModelOutputWithPast(last_hidden_state=hidden)

    backbone.forward = forward
    try:
        yield
    finally:
        del backbone.forward  # the class's own forward again


@contextlib.contextmanager
def labelled_positions_only() -> Iterator[None]:
    """Within the block, TRL's fused LM head scores only the labelled positions on CPU too (its
    ``_use_triton`` device check, which picks that path, says yes for CPU); a TRL without that check is left
    as it is."""
    import trl.trainer.utils as trl_utils

    on_triton = getattr(trl_utils, "_use_triton", None)
    if on_triton is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or on_triton(device)
    try:
        yield
    finally:
        trl_utils._use_triton = on_triton


def packed_dpo_trainer_class() -> type:
    """TRL's ``DPOTrainer`` whose loss and reference log-probabilities run through :func:`packed_pair_backbone`
    and :func:`labelled_positions_only`."""
    from trl import DPOTrainer

    class PackedDPOTrainer(DPOTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            with packed_pair_backbone(self.model), labelled_positions_only():
                return super().compute_loss(model, inputs, *args, **kwargs)

        def compute_ref_log_probs(self, model, inputs):
            with packed_pair_backbone(model), labelled_positions_only():
                return super().compute_ref_log_probs(model, inputs)

    return PackedDPOTrainer

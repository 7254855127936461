"""Response log-likelihoods and pooled hidden states of (prompt, response) sequences.

A sequence is the chat-template rendering of the user ``prompt`` (with the generation header) followed by
the ``response`` tokens and the end-of-turn (EOS) token; labels cover the response tokens only.

``s(y|x) = (1/|y|) sum_{i in response} log pi(y_i | x, y_<i)`` is computed without ever materialising
full-vocabulary logits for the whole batch: the base model (no LM head) gives the final hidden states, the
positions that predict a response token are selected, and the LM head is applied to them in chunks with
``logsumexp``/``gather``. Under autograd each chunk is recomputed in the backward pass
(:class:`ChunkedTokenLogps`, or activation checkpointing for other heads), so at most one chunk of logits is
alive at any time. Sequences that only need pooled
states (the dominant side in training, for L2) skip the LM head entirely. The chosen and rejected sequences
of a pair share their prompt; with ``paired=True`` that prompt runs once (:func:`paired_final_hidden_states`).

Batches are right-padded; padding never changes a result (real tokens never attend to later positions,
and padding is excluded from every sum).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from mpo_core.method.losses import masked_mean_pool, reward_gap

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LOGITS_CHUNK_ELEMENTS = 1 << 24  # at most this many logits (64 MiB in float32) per chunk
Reduce = Callable[[torch.Tensor], object]  # what is computed from the final hidden states inside the forward


@dataclass(frozen=True)
class EncodedSequence:
    """Token ids of one prompt+response sequence; ``input_ids[prompt_len:]`` are the response tokens."""

    input_ids: list[int]
    prompt_len: int

    @property
    def num_response_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as the chat template renders a single user turn, ending with the assistant header."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode_prompt_responses(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    responses: Sequence[str],
    max_length: int,
    *,
    truncation: str = "prompt_left",
) -> list[EncodedSequence]:
    """Tokenise ``chat_template(prompt) + response + EOS`` for each response, into at most ``max_length``
    tokens each, all with the same prompt tokens.

    ``truncation="prompt_left"`` (mpo's): each response is cut first down to
    ``max(max_length - len(prompt), max_length // 2)`` tokens (keeping its start), then the prompt is cut
    from the left (keeping the assistant header) to fit the longest response.
    ``truncation="llama_factory"`` (the official MPO code's): the budget is split as LLaMA-Factory splits it
    between the prompt and the longest response (:func:`llama_factory_lengths`), and both are cut from the
    right (the prompt may lose its assistant header).
    At least one response token always remains. One shared prompt cut keeps the chosen and rejected answers
    of a pair answering the same prompt, and lets their prefix run once (:func:`paired_final_hidden_states`).
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    response_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + eos for r in responses]
    longest = max((len(ids) for ids in response_ids), default=0)
    if truncation == "llama_factory":
        prompt_keep, response_keep = llama_factory_lengths(len(prompt_ids), longest, max_length)
        prompt_ids, response_ids = prompt_ids[:prompt_keep], [ids[:response_keep] for ids in response_ids]
    else:
        response_budget = max(max_length - len(prompt_ids), max_length // 2, 1)
        response_ids = [ids[:response_budget] for ids in response_ids]
        longest = max((len(ids) for ids in response_ids), default=0)
        prompt_ids = prompt_ids[-max(max_length - longest, 1) :]
    return [EncodedSequence(list(prompt_ids) + ids, len(prompt_ids)) for ids in response_ids]


TRUNCATIONS = ("prompt_left", "llama_factory")


def llama_factory_lengths(prompt_len: int, response_len: int, max_length: int) -> tuple[int, int]:
    """``(prompt tokens kept, response tokens kept)`` as LLaMA-Factory's pairwise preprocessing (the official
    MPO code) splits ``max_length``: a short response keeps all it has; else a short prompt keeps all it
    has; else both share the budget in proportion to their lengths."""
    if 2 * response_len < max_length:
        response_cap = max_length
    elif 2 * prompt_len < max_length:
        response_cap = max_length - prompt_len
    else:
        response_cap = int(max_length * response_len / (prompt_len + response_len))
    response_keep = min(response_cap, response_len)
    return min(max(max_length - response_keep, 0), prompt_len), response_keep


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> EncodedSequence:
    """One sequence of :func:`encode_prompt_responses`."""
    return encode_prompt_responses(tokenizer, prompt, [response], max_length)[0]


def collate_sequences(
    sequences: Sequence[EncodedSequence], pad_token_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad into ``input_ids``, ``attention_mask`` (real tokens) and ``response_mask`` (labels)."""
    length = max(max(len(s.input_ids) for s in sequences), pad_to or 0)
    batch = len(sequences)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    response_mask = torch.zeros((batch, length), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        n = len(seq.input_ids)
        input_ids[row, :n] = torch.tensor(seq.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        response_mask[row, seq.prompt_len : n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def collate_pairs(
    pairs: Sequence[tuple[EncodedSequence, EncodedSequence]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Collate ``(chosen, rejected)`` encodings in the layout ``paired=True`` reads: the ``n`` chosen rows,
    then the ``n`` rejected rows, so that rows ``b`` and ``b + n`` are one pair."""
    return collate_sequences([c for c, _ in pairs] + [r for _, r in pairs], pad_token_id)


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


PACKABLE_ATTENTION = ("sdpa", "eager")  # the implementations that take an arbitrary 4D mask


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
    if implementation == "sdpa":
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


def sequence_outputs(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    *,
    with_logps: bool = True,
    with_pooled: bool = True,
    paired: bool = False,
) -> dict[str, torch.Tensor]:
    """One backbone forward of a collated batch: ``avg_logps`` [B] (response tokens) and/or ``pooled`` [B, H]
    (mean of the final hidden states over real tokens). ``paired``: rows ``b`` and ``b + B/2`` are the chosen
    and rejected sequence of one pair, and their shared prompt runs once (:func:`paired_final_hidden_states`)."""
    hidden_states = paired_final_hidden_states if paired else final_hidden_states

    def reduce(hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if with_logps:
            sums, counts = response_logp_sums(model, hidden, batch["input_ids"], batch["response_mask"])
            out["logp_sums"], out["response_tokens"] = sums, counts
            out["avg_logps"] = sums / counts.clamp_min(1).to(sums.dtype)
        if with_pooled:
            out["pooled"] = masked_mean_pool(hidden, batch["attention_mask"])
        return out

    return hidden_states(model, batch["input_ids"], batch["attention_mask"], reduce)


def full_logits_outputs(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper code's way, kept as the yardstick for tests and benchmarks: full-vocabulary logits of the
    whole batch through ``model(...)``, upcast to float32, ``log_softmax``, masked mean over the response;
    pooled states from ``hidden_states[-1]`` (here pooled over real tokens, as everywhere in mpo)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        use_cache=False,
    )
    logits = out.logits[:, :-1]
    logps = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    token_logps = logps.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = batch["response_mask"][:, 1:]
    sums = (token_logps * mask).sum(-1)
    counts = mask.sum(-1)
    return {
        "avg_logps": sums / counts.clamp_min(1),
        "pooled": masked_mean_pool(out.hidden_states[-1], batch["attention_mask"]),
    }


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first) to cut padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _model_device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def response_avg_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    *,
    max_length: int,
    batch_size: int,
) -> torch.Tensor:
    """``s(y|x)`` for each (prompt, response) pair, in input order, as a float32 CPU tensor (no grad)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    encoded = [encode_prompt_response(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    result = torch.zeros(len(encoded), dtype=torch.float32)
    device = _model_device(model)
    for idx in length_sorted_batches([len(e.input_ids) for e in encoded], batch_size):
        batch = {
            k: v.to(device)
            for k, v in collate_sequences([encoded[i] for i in idx], tokenizer.pad_token_id).items()
        }
        result[idx] = sequence_outputs(model, batch, with_pooled=False)["avg_logps"].float().cpu()
    return result


@torch.no_grad()
def pair_avg_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    *,
    max_length: int,
    batch_size: int,
    truncation: str = "prompt_left",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s(y_w|x), s(y_l|x))`` per pair, in input order, as float32 CPU tensors (no grad), encoded as the
    reference stage and the trainer encode a pair (one prompt cut for both answers by ``truncation``, the
    prompt run once)."""
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected")
    encoded = [
        encode_prompt_responses(tokenizer, p, [c, r], max_length, truncation=truncation)
        for p, c, r in zip(prompts, chosen, rejected)
    ]
    result = torch.zeros(2, len(encoded), dtype=torch.float32)
    device = _model_device(model)
    lengths = [max(len(c.input_ids), len(r.input_ids)) for c, r in encoded]
    for idx in length_sorted_batches(lengths, batch_size):
        collated = collate_pairs([encoded[i] for i in idx], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in collated.items()}
        avg = sequence_outputs(model, batch, with_pooled=False, paired=True)["avg_logps"].float().cpu()
        result[:, idx] = avg.view(2, len(idx))
    return result[0], result[1]


def reward_gaps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    *,
    max_length: int,
    batch_size: int,
    truncation: str = "prompt_left",
) -> torch.Tensor:
    """``RG = s(y_w|x) - s(y_l|x)`` per prompt under ``model`` (float32 CPU tensor, no grad)."""
    return reward_gap(
        *pair_avg_logps(
            model, tokenizer, prompts, chosen, rejected, max_length=max_length, batch_size=batch_size,
            truncation=truncation,
        )
    )

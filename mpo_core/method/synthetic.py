"""Random-weight models and random token batches for checks and benchmarks: no download, no data.

:func:`synthetic_causal_lm` builds a transformers causal LM from a config alone (``llama`` or ``gemma2``,
sizes in :data:`SIZES`, ``1b`` is Llama-3.2-1B's shape); :func:`synthetic_mpo_batch` builds a collated MPO
batch in the layout :class:`mpo_core.training.examples.MPOCollator` returns (target and dominant sides, each pair's
chosen and rejected sharing their prompt, right-padded, ``ref_gap`` and ``ref_pooled``).
"""

from __future__ import annotations

from typing import Any

import torch

from mpo_core.method.encoding import EncodedSequence, collate_pairs

SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512,
    },
    "1b": {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256,
    },
}


def synthetic_causal_lm(
    architecture: str = "llama",
    size: str = "tiny",
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    **overrides: Any,
):
    """A causal LM of ``architecture`` (``llama``/``gemma2``) and ``size`` with random weights, dropout off,
    tied embeddings, in ``dtype`` on ``device``; ``overrides`` go to the config (e.g. ``sliding_window``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**SIZES[size], "tie_word_embeddings": True, "max_position_embeddings": 4096, **overrides}
    settings.setdefault("head_dim", settings["hidden_size"] // settings["num_attention_heads"])
    config = AutoConfig.for_model(architecture, **settings)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model


def random_pairs(
    n_pairs: int, prompt_len: int, response_len: int, vocab: int, generator: torch.Generator
) -> list[tuple[EncodedSequence, EncodedSequence]]:
    """``n_pairs`` (chosen, rejected) encodings with one shared random prompt each and random answers of
    ``response_len // 2`` to ``response_len`` tokens."""
    pairs = []
    for _ in range(n_pairs):
        prompt = torch.randint(1, vocab, (prompt_len,), generator=generator).tolist()
        answers = []
        for _ in range(2):
            length = int(torch.randint(response_len // 2, response_len + 1, (), generator=generator))
            answers.append(EncodedSequence(prompt + torch.randint(1, vocab, (length,), generator=generator).tolist(),
                                           prompt_len))
        pairs.append((answers[0], answers[1]))
    return pairs


def synthetic_mpo_batch(
    n_pairs: int, prompt_len: int, response_len: int, vocab: int, hidden: int, *, seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """A collated MPO batch of random tokens, with random reference gaps and pooled states."""
    generator = torch.Generator().manual_seed(seed)
    batch: dict[str, Any] = {"target_lang": ["xx"] * n_pairs}
    for side in ("target", "dominant"):
        collated = collate_pairs(random_pairs(n_pairs, prompt_len, response_len, vocab, generator), 0)
        batch.update({f"{side}_{key}": tensor.to(device) for key, tensor in collated.items()})
    batch["ref_gap"] = torch.randn(n_pairs, generator=generator).to(device)
    batch["ref_pooled"] = torch.randn(2 * n_pairs, hidden, generator=generator).to(device)
    return batch


def synthetic_tokenizer(vocab: int):
    """A word-level tokenizer over the words ``t0 .. t{vocab-1}`` (``t0`` pad, ``t1`` EOS), built in memory:
    ``"t5 t9"`` encodes to ``[5, 9]``, so random token ids can go through text-based trainers (TRL)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", eos_token="t1", unk_token="t2")


def as_words(ids: list[int]) -> str:
    """Token ids as :func:`synthetic_tokenizer` text, each word preceded by a space."""
    return "".join(f" t{i}" for i in ids)

"""Training rows: tokenised pairs with the reference's gap and pooled states (:func:`build_examples`), their
collation (:class:`MPOCollator`), and TRL's conversational rows for the baselines (:func:`preference_rows`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from mpo_core.method.encoding import collate_pairs, encode_prompt_responses
from mpo_core.plumbing.errors import InputDataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase



def build_examples(
    tokenizer: PreTrainedTokenizerBase,
    pairs: pa.Table,
    reference: pa.Table | None,
    max_length: int,
    *,
    origin: str = "pairs",
    truncation: str = "prompt_left",
) -> list[dict[str, Any]]:
    """Tokenised training rows: target chosen/rejected, dominant chosen/rejected, the reference's gap and
    pooled states (joined on ``pair_id``). A pair missing from ``reference`` is an error naming it."""
    ref_rows: dict[str, dict[str, Any]] = {}
    if reference is not None:
        for row in reference.select(
            ["pair_id", "reward_gap", "chosen_pooled", "rejected_pooled"]
        ).to_pylist():
            ref_rows[row["pair_id"]] = row
    examples = []
    for i, row in enumerate(pairs.to_pylist()):
        example: dict[str, Any] = {"pair_id": row["pair_id"], "target_lang": row["target_lang"]}
        for lang_side in ("target", "dominant"):
            example[f"{lang_side}_chosen"], example[f"{lang_side}_rejected"] = encode_prompt_responses(
                tokenizer,
                row[f"{lang_side}_prompt"],
                [row[f"{lang_side}_chosen"], row[f"{lang_side}_rejected"]],
                max_length,
                truncation=truncation,
            )
        if reference is not None:
            ref = ref_rows.get(row["pair_id"])
            if ref is None:
                raise InputDataError(
                    f"{origin}: row {i}, column 'pair_id': {row['pair_id']!r} has no reference row"
                )
            example["ref_gap"] = ref["reward_gap"]
            example["ref_pooled"] = [ref["chosen_pooled"], ref["rejected_pooled"]]
        examples.append(example)
    return examples


class MPOCollator:
    """Collates :func:`build_examples` rows into right-padded ``target_*`` and ``dominant_*`` batches
    (chosen rows first, then rejected) plus ``ref_gap [B]`` and ``ref_pooled [2B, H]``."""

    def __init__(self, pad_token_id: int, with_dominant: bool = True) -> None:
        self.pad_token_id, self.with_dominant = pad_token_id, with_dominant

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"target_lang": [r["target_lang"] for r in rows]}
        sides = ("target", "dominant") if self.with_dominant else ("target",)
        for lang_side in sides:
            pairs = [(r[f"{lang_side}_chosen"], r[f"{lang_side}_rejected"]) for r in rows]
            for name, tensor in collate_pairs(pairs, self.pad_token_id).items():
                batch[f"{lang_side}_{name}"] = tensor
        if "ref_gap" in rows[0]:
            batch["ref_gap"] = torch.tensor([r["ref_gap"] for r in rows], dtype=torch.float32)
            if self.with_dominant:
                pooled = [r["ref_pooled"][0] for r in rows] + [r["ref_pooled"][1] for r in rows]
                batch["ref_pooled"] = torch.tensor(pooled, dtype=torch.float32)
        return batch


def preference_rows(pairs: pa.Table, loss: str) -> list[dict[str, Any]]:
    """TRL conversational rows on the target-language side of each pair."""
    rows = []
    for row in pairs.select(["target_prompt", "target_chosen", "target_rejected"]).to_pylist():
        prompt = [{"role": "user", "content": row["target_prompt"]}]
        chosen = [{"role": "assistant", "content": row["target_chosen"]}]
        if loss == "sft":
            rows.append({"prompt": prompt, "completion": chosen})
        else:
            rejected = [{"role": "assistant", "content": row["target_rejected"]}]
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows

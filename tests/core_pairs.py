"""Real MPO quadruples for the CORE tests: the paper's released data as PAIRS rows.

Uses DATA's ``mpo_core.readers.pairs.load_pairs`` when it exists; otherwise reads the LLaMA-Factory "ranking" JSON
directly (the file's fields are documented in ../shared/data/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from mpo_core.plumbing.artifacts import to_table, write_artifact


def official_pairs(shared_data: Path, n: int, model: str = "llama", step: int = 1) -> pa.Table:
    """Every ``step``-th of the first ``n * step`` quadruples of ``mpo_official/<model>_mpo_data.json``."""
    path = shared_data / "mpo_official" / f"{model}_mpo_data.json"
    try:
        from mpo_core.readers.pairs import load_pairs
    except ImportError:
        load_pairs = None
    if load_pairs is not None:
        table = load_pairs(path)
        return table.take(list(range(0, min(n * step, table.num_rows), step))[:n])
    import py3langid

    records = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for i in range(0, n * step, step):
        r = records[i]
        rows.append(
            {
                "pair_id": f"{model}-{i}",
                "prompt_id": f"{model}-{i // 6}",
                "dominant_lang": "zh" if model == "qwen" else "en",
                "target_lang": py3langid.classify(r["target_conversations"][0]["value"])[0],
                "dominant_prompt": r["source_conversations"][0]["value"],
                "dominant_chosen": r["source_chosen"]["value"],
                "dominant_rejected": r["source_rejected"]["value"],
                "target_prompt": r["target_conversations"][0]["value"],
                "target_chosen": r["target_chosen"]["value"],
                "target_rejected": r["target_rejected"]["value"],
                "source": "mpo_official",
                "dominant_chosen_fallback": False,
                "target_chosen_fallback": False,
            }
        )
    return to_table(rows, "pairs")


def write_pairs(table: pa.Table, path: Path) -> Path:
    """Write ``table`` as a PAIRS artifact (with its manifest) and return the path."""
    write_artifact(table, path, "pairs")
    return path

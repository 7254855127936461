"""The project's own seed prompt set (``mpo_core/data/seed_prompts.jsonl``), loaded and validated.

Provenance, licence and the fixed train/eval split are documented in ``mpo_core/data/SEED_PROVENANCE.md``:
60 harmful and 30 benign requests written by the mpo project in English, each with a translation into
zh, ja, ko, ar, bn and sw made for the project. One row per prompt per language; ``prompt_id`` is shared
across languages. Split: the n-th prompt of each group (harmful ``hNNN``, benign ``bNNN``) is ``eval`` when
n is a multiple of 3, else ``train``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from mpo_core.plumbing.errors import InputDataError

SEED_FILE = "seed_prompts.jsonl"
SEED_SOURCE = "mpo-seed-v1"
SEED_LANGS = ("en", "zh", "ja", "ko", "ar", "bn", "sw")
_FIELDS = {
    "prompt_id": str, "lang": str, "text": str, "category": str, "split": str,
    "harmful": bool, "source": str, "translated_by": str,
}


def seed_path() -> Path:
    """Path of the packaged seed set."""
    return Path(str(resources.files("mpo_core") / "data" / SEED_FILE))


def seed_split(prompt_id: str) -> str:
    """The fixed split of a seed prompt: ``eval`` for every third prompt of its group, else ``train``."""
    return "eval" if int(prompt_id[1:]) % 3 == 0 else "train"


def load_seed_prompts(path: str | Path | None = None) -> list[dict]:
    """Rows of the seed set, validated: fields and types, split rule, every prompt in every language."""
    path = Path(path) if path is not None else seed_path()
    rows: list[dict] = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputDataError(f"{path}: line {line_no} is not valid JSON: {err}") from None
            _validate_row(row, path, line_no)
            rows.append(row)
    _check_complete(rows, path)
    return rows


def _validate_row(row: dict, path: Path, line_no: int) -> None:
    for name, type_ in _FIELDS.items():
        if not isinstance(row.get(name), type_) or (type_ is str and not row[name].strip()):
            raise InputDataError(f"{path}: line {line_no}, field {name!r}: expected non-empty {type_.__name__}")
    extra = set(row) - set(_FIELDS)
    if extra:
        raise InputDataError(f"{path}: line {line_no}: unknown field(s) {sorted(extra)}")
    if row["split"] != seed_split(row["prompt_id"]):
        raise InputDataError(f"{path}: line {line_no}, field 'split': {row['split']!r} breaks the split rule")
    expected_by = "original" if row["lang"] == "en" else "provided"
    if row["translated_by"] != expected_by:
        raise InputDataError(f"{path}: line {line_no}, field 'translated_by': expected {expected_by!r}")


def _check_complete(rows: list[dict], path: Path) -> None:
    seen: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row["prompt_id"], row["lang"])
        if key in seen:
            raise InputDataError(f"{path}: prompt {key[0]!r} appears twice in language {key[1]!r}")
        seen[key] = 1
    for prompt_id in sorted({pid for pid, _ in seen}):
        for lang in SEED_LANGS:
            if (prompt_id, lang) not in seen:
                raise InputDataError(f"{path}: prompt {prompt_id!r} has no {lang!r} row")

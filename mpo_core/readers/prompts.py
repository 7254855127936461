"""Prompt sets as PROMPTS rows: the seed set, MultiJail-style wide CSV, plain Parquet/CSV/JSONL prompt
tables, and the prompts of pair files; limited, language-filtered and split.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

import pyarrow as pa

from mpo_core.plumbing.config import PipelineConfig, PromptsConfig
from mpo_core.plumbing.errors import InputDataError
from mpo_core.plumbing.languages import normalize_lang
from mpo_core.plumbing.schemas import PROMPTS
from mpo_core.plumbing.seed import load_seed_prompts
from mpo_core.readers.files import (
    checked_text,
    detect_format,
    location,
    read_csv_records,
    read_json_lines,
    resolve_source,
    wide_language_columns,
)
from mpo_core.readers.ids import assign_split, content_id
from mpo_core.readers.pairs import load_pairs

MULTIJAIL_HUB_ID = "DAMO-NLP-SG/MultiJail"


MULTIJAIL_HUB_SOURCE = "hf://DAMO-NLP-SG/MultiJail/MultiJail.csv"


class UniquePrompts:
    """Rows of one prompt file keyed by (prompt id, language): the same text again is dropped, another
    text under the same key is an :class:`InputDataError` naming both rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.first: dict[tuple[str, str], tuple[str, int]] = {}

    def is_new(self, prompt_id: str, lang: str, text: str, column: str, row: int) -> bool:
        key = (prompt_id, lang)
        if key not in self.first:
            self.first[key] = (text.strip(), row)
            return True
        earlier, earlier_row = self.first[key]
        if earlier != text.strip():
            raise InputDataError(
                f"{location(self.path, column, row)}: prompt {prompt_id!r} in language {lang!r} has another text "
                f"in row {earlier_row}; each (id, language) must have one text"
            )
        return False


def _prompt_row(prompt_id: str, lang: str, text: str, source: str, *, translated_by: str = "original",
                category: str | None = None, split: str | None = None, harmful: bool = True) -> dict:
    return {"prompt_id": prompt_id, "lang": lang, "text": text.strip(), "category": category, "split": split,
            "source": source, "translated_by": translated_by, "harmful": harmful}


def read_multijail(path: Path) -> list[dict]:
    """MultiJail-style wide CSV: one row per prompt, one text column per language code."""
    header, records = read_csv_records(path)
    lang_columns = wide_language_columns(header)
    if "id" not in header or not lang_columns:
        raise InputDataError(f"{path}: column 'id' and at least one language column are required")
    base = "en" if "en" in lang_columns else lang_columns[0]
    rows = []
    unique = UniquePrompts(path)
    for row_no, record in enumerate(records):
        raw_id = (record.get("id") or "").strip()
        if not raw_id:
            raise InputDataError(f"{location(path, 'id', row_no)}: empty id")
        category = _multijail_category(record.get("tags"), path, row_no)
        source = f"multijail:{record.get('source') or path.name}"
        for lang in lang_columns:
            text = checked_text(record.get(lang), path, lang, row_no)
            if unique.is_new(f"multijail-{raw_id}", lang, text, lang, row_no):
                rows.append(_prompt_row(f"multijail-{raw_id}", normalize_lang(lang), text, source,
                                        translated_by="original" if lang == base else "provided",
                                        category=category))
    return rows


def _multijail_category(tags: str | None, path: Path, row: int) -> str | None:
    if not tags or not tags.strip():
        return None
    try:
        parsed = ast.literal_eval(tags)
    except (ValueError, SyntaxError):
        return tags.strip()
    if isinstance(parsed, (list, tuple)):
        return "; ".join(str(t) for t in parsed) or None
    return str(parsed)


def _read_records(path: Path, fmt: str) -> tuple[list[str], Iterator[dict]]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise InputDataError(f"{path}: not a readable Parquet file: {err}") from None
        return table.column_names, iter(table.to_pylist())
    if fmt == "csv":
        header, rows = read_csv_records(path)
        return header, iter(rows)

    records = read_json_lines(path)
    if not records:
        raise InputDataError(f"{path}: no JSON records in the file")
    return sorted({k for r in records for k in r}), iter(records)


def read_prompt_table(path: Path, fmt: str, cfg: PromptsConfig) -> list[dict]:
    """A plain prompt set (Parquet/CSV/JSONL) with ``cfg.text_column`` and ``cfg.lang_column``."""
    columns, records = _read_records(path, fmt)
    for needed in (cfg.text_column, cfg.lang_column):
        if needed not in columns:
            raise InputDataError(f"{path}: column {needed!r} is missing (columns: {columns})")
    rows = []
    unique = UniquePrompts(path)
    for row_no, record in enumerate(records):
        text = checked_text(record.get(cfg.text_column), path, cfg.text_column, row_no)
        lang = normalize_lang(record.get(cfg.lang_column), location(path, cfg.lang_column, row_no))
        prompt_id = record.get(cfg.id_column) if cfg.id_column in columns else None
        prompt_id = str(prompt_id).strip() if prompt_id not in (None, "") else content_id(lang, text, prefix="p-",
                                                                                          length=12)
        split = record.get("split") or None
        if split not in (None, "train", "eval"):
            raise InputDataError(f"{location(path, 'split', row_no)}: split must be train or eval, got {split!r}")
        harmful = record.get("harmful", cfg.default_harmful)
        if isinstance(harmful, str):
            if harmful.strip().lower() not in ("true", "false", "1", "0"):
                raise InputDataError(f"{location(path, 'harmful', row_no)}: expected true/false, got {harmful!r}")
            harmful = harmful.strip().lower() in ("true", "1")
        if not isinstance(harmful, bool):
            raise InputDataError(f"{location(path, 'harmful', row_no)}: expected true/false, got {harmful!r}")
        if not unique.is_new(prompt_id, lang, text, cfg.text_column, row_no):
            continue
        rows.append(_prompt_row(prompt_id, lang, text, record.get("source") or f"{fmt}:{path.name}",
                                translated_by=record.get("translated_by") or "original",
                                category=record.get("category") or None, split=split, harmful=harmful))
    return rows


def _prompts_from_pairs(pairs: pa.Table) -> list[dict]:
    rows, seen = [], set()
    for pair in pairs.to_pylist():
        for lang, text, by in ((pair["dominant_lang"], pair["dominant_prompt"], "original"),
                               (pair["target_lang"], pair["target_prompt"], "provided")):
            if text.strip() and (pair["prompt_id"], lang) not in seen:
                seen.add((pair["prompt_id"], lang))
                rows.append(_prompt_row(pair["prompt_id"], lang, text, pair["source"], translated_by=by))
    return rows


def _first_prompt_ids(rows: list[dict], limit: int) -> list[str]:
    """The first ``limit`` prompt ids, taken in turn from harmful and benign prompts (order kept in each),
    so that a limited set still measures over-refusal when the source has benign prompts."""
    groups: dict[bool, list[str]] = {True: [], False: []}
    for row in rows:
        ids = groups[bool(row.get("harmful", True))]
        if row["prompt_id"] not in ids:
            ids.append(row["prompt_id"])
    interleaved = [pid for pair in zip_longest(groups[True], groups[False]) for pid in pair if pid is not None]
    return interleaved[:limit]


def ingest_prompt_set(config: PipelineConfig, source: str) -> list[dict]:
    """A prompt set (MultiJail CSV, any prompt file, ``hf://`` source or the MultiJail hub id) read by the
    ingest loader; every row is used, whatever its split."""

    source = MULTIJAIL_HUB_SOURCE if source == MULTIJAIL_HUB_ID else source
    return load_prompts(PromptsConfig(source=source), seed=config.run.seed).to_pylist()


def load_prompts(cfg: PromptsConfig, seed: int = 0) -> pa.Table:
    """The PROMPTS table for ``cfg``: read, restricted to ``cfg.langs``, limited, split assigned."""
    if cfg.source == "seed" or cfg.format == "seed":
        rows = load_seed_prompts()
    else:
        path = resolve_source(cfg.source)
        fmt = detect_format(path) if cfg.format == "auto" else cfg.format
        if fmt == "multijail":
            rows = read_multijail(path)
        elif fmt in ("mpo_json", "hh_rlhf"):
            rows = _prompts_from_pairs(load_pairs(path, fmt))
        else:
            rows = read_prompt_table(path, fmt, cfg)
        if not rows:
            raise InputDataError(f"{path}: the file holds no prompts")
    if cfg.langs is not None:
        wanted = {normalize_lang(lang, "prompts.langs") for lang in cfg.langs}
        rows = [r for r in rows if r["lang"] in wanted]
    if cfg.limit is not None:
        keep = set(_first_prompt_ids(rows, cfg.limit))
        rows = [r for r in rows if r["prompt_id"] in keep]
    for row in rows:
        row["split"] = row.get("split") or assign_split(row["prompt_id"], cfg.split_eval_fraction, seed)
    if not rows:
        raise InputDataError(f"{cfg.source}: no prompts left (check prompts.langs / prompts.limit)")
    return pa.Table.from_pylist(rows, schema=PROMPTS)

"""Opening and reading input files: text (gzip, BOM), CSV and JSON lines through Arrow's readers, the
format of a file, and field checks whose errors name file, column and row.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import unicodedata
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from mpo_core.plumbing.errors import InputDataError
from mpo_core.plumbing.languages import is_valid_lang

HUB_PREFIX = "hf://"


def resolve_source(source: str | Path) -> Path:
    """A local path for ``source``; ``hf://<repo_id>/<file>`` is downloaded from the hub (online users)."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        from huggingface_hub import hf_hub_download

        owner, name, *rest = text[len(HUB_PREFIX):].split("/")
        if not rest:
            raise InputDataError(f"{text}: a hub source is hf://<owner>/<dataset>/<file in the repo>")
        return Path(hf_hub_download(f"{owner}/{name}", "/".join(rest), repo_type="dataset"))
    path = Path(text).expanduser()
    if not path.is_file():
        raise InputDataError(f"{path}: input file not found")
    return path


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig", newline="")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn what a damaged file raises while it is read (bad UTF-8, bad or cut gzip) into an
    :class:`InputDataError` naming the file and what is wrong with it."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise InputDataError(
            f"{path}: not UTF-8 text (byte {err.start} of the {'decompressed ' if path.name.endswith('.gz') else ''}"
            f"text: {err.reason}); save the file as UTF-8"
        ) from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise InputDataError(f"{path}: not a valid gzip file ({err})") from None
    except EOFError:
        raise InputDataError(f"{path}: the gzip file is truncated (it ends before its end-of-stream marker)") from None


def read_text(path: Path) -> str:
    """The whole text of ``path`` (``.gz`` decompressed, UTF-8 with or without BOM); named errors."""
    with _reading(path), _open_text(path) as fh:
        return fh.read()


def detect_format(path: Path) -> str:
    """The format of ``path`` from its name and first record (see the module docstring)."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".json"):
        return "mpo_json"
    if name.endswith((".jsonl", ".jsonl.gz")):
        with _reading(path), _open_text(path) as fh:
            first = next((line for line in fh if line.strip()), "{}")
        try:
            keys = set(json.loads(first))
        except (json.JSONDecodeError, TypeError):
            keys = set()
        return "hh_rlhf" if {"chosen", "rejected"} <= keys else "jsonl"
    if name.endswith(".csv"):
        header = csv_header(read_text(path))
        is_wide = "id" in header and len(wide_language_columns(header)) >= 2 and not {"text", "lang"} & set(header)
        return "multijail" if is_wide else "csv"
    raise InputDataError(f"{path}: cannot tell the format from the name; set prompts.format")


def wide_language_columns(header: list[str]) -> list[str]:
    """The language columns of a MultiJail-style wide CSV: two-letter ISO 639-1 codes, ``id`` excepted
    (Indonesian's code is the id column there). Three-letter codes are left out: ordinary column names
    such as ``src`` and ``url`` are ISO 639-3 codes too."""
    return [h for h in header if h != "id" and len(h) == 2 and is_valid_lang(h)]


def location(path: Path, column: str, row: int) -> str:
    return f"{path}: column {column!r}, row {row}"


def is_visible(text: str) -> bool:
    """True if ``text`` has a character that shows: not whitespace, a control or a format character
    (zero-width space U+200B, joiners, BOM, direction marks)."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Zs") for ch in text)


def checked_text(value: Any, path: Path, column: str, row: int, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InputDataError(f"{location(path, column, row)}: expected text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InputDataError(f"{location(path, column, row)}: empty text")
    if not allow_empty and not is_visible(value):
        raise InputDataError(
            f"{location(path, column, row)}: text has only invisible characters "
            f"({', '.join(sorted({f'U+{ord(c):04X}' for c in value if not c.isspace()}))})"
        )
    return value


def read_json_lines(path: Path) -> list[dict]:
    """The records of a ``.jsonl(.gz)`` file, read by Arrow's JSON reader (escapes, types, nested values):
    one ``{field: value}`` per record, without the fields it lacks or holds as null; row ``i`` is the
    ``i``-th record (blank lines skipped). A line that is not a JSON object, or a field whose JSON type
    changes between rows, is an :class:`InputDataError` naming the row (found by :func:`_json_lines_error`)."""
    import pyarrow.json as pajson

    text = read_text(path)
    if not text.strip():
        return []
    data = text.encode("utf-8")
    options = pajson.ReadOptions(use_threads=False, block_size=max(len(data), 1 << 20))  # one block: no line straddles two
    try:
        table = pajson.read_json(io.BytesIO(data), read_options=options)
    except pa.ArrowInvalid as err:
        raise _json_lines_error(path, text, err) from None
    return [{field: value for field, value in record.items() if value is not None} for record in table.to_pylist()]


def _json_kind(value: Any) -> str:
    kinds = ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "list"), (dict, "object"))
    return next(name for types, name in kinds if isinstance(value, types))


def _json_lines_error(path: Path, text: str, err: pa.ArrowInvalid) -> InputDataError:
    """What Arrow refused in ``text``, found line by line (the error path only): the first line that is not
    JSON or not an object, or the first field whose JSON type differs from its first row's."""
    first_kinds: dict[str, tuple[str, int]] = {}
    row = -1
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        row += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as bad:
            return InputDataError(f"{path}: row {row} (line {line_no}) is not valid JSON: {bad}")
        if not isinstance(record, dict):
            return InputDataError(f"{path}: row {row} is not a JSON object")
        for field, value in record.items():
            if value is None:
                continue
            kind, (first_kind, first_row) = _json_kind(value), first_kinds.setdefault(field, (_json_kind(value), row))
            if kind != first_kind:
                return InputDataError(f"{location(path, field, row)}: a JSON {kind} where row {first_row} holds a "
                                      f"{first_kind}; give a field one type in every row")
    return InputDataError(f"{path}: not readable as JSON lines: {err}")


def read_csv_records(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """``(header, one {column: text} per row)`` of a CSV file, every value a string, read by Arrow's CSV
    reader (quotes, embedded newlines). A row with more or fewer fields than the header, which is what an
    unquoted comma inside a text makes, is an :class:`InputDataError` naming the row."""
    import pyarrow.csv as pacsv

    text = read_text(path)
    header = csv_header(text)
    if not any(header):
        raise InputDataError(f"{path}: empty CSV file (no header row)")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise InputDataError(f"{path}: column(s) {repeated} appear more than once in the header")
    bad_rows = []

    def on_bad_row(row) -> str:
        bad_rows.append(row)
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(text.encode("utf-8")),
            read_options=pacsv.ReadOptions(use_threads=False, column_names=header, skip_rows=1),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_bad_row),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()),
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as err:
        raise InputDataError(f"{path}: not a readable CSV file: {err}") from None
    if bad_rows:
        bad = bad_rows[0]  # Arrow numbers records from 1 with the header first; rows here count from 0
        raise InputDataError(
            f"{path}: row {bad.number - 2}: {bad.actual_columns} fields where the header has "
            f"{bad.expected_columns} (a comma inside a text must be quoted: \"...,...\"): {bad.text[:80]!r}"
        )
    return header, table.to_pylist()


def csv_header(text: str) -> list[str]:
    """The column names of CSV ``text`` (stripped), parsed by Arrow's CSV reader from its first block;
    ``[]`` for an empty text."""
    import pyarrow.csv as pacsv

    try:
        reader = pacsv.open_csv(
            io.BytesIO(text.encode("utf-8")),
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=lambda row: "skip"),
        )
    except pa.ArrowInvalid:
        if text.strip():
            raise
        return []
    return [name.strip() for name in reader.schema.names]

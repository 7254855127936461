"""Artifact I/O: Parquet files with a JSON manifest beside them, written atomically, validated on read.

``<name>.parquet`` holds the rows; ``<name>.parquet.manifest.json`` holds the kind, row count, a content
hash, the schema version, the hash of the config that produced it, the content hashes of its inputs and the
code version. Every write goes through :class:`ArtifactWriter`: record batches are validated against the
kind's schema (:mod:`mpo_core.plumbing.schemas`) and streamed to a temporary file in the same folder, which is
renamed into place only when the whole write succeeded, Parquet first and manifest last. A failing write
leaves neither file nor manifest behind, and an artifact already at that path untouched; a crash between the
two renames leaves a Parquet file whose hash does not match the old manifest, which readers refuse.

Every error names the file, and where it can the column and the first offending row.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Self

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mpo_core import __version__
from mpo_core.plumbing import profile
from mpo_core.plumbing.errors import ArtifactError, InputDataError
from mpo_core.plumbing.languages import normalize_lang
from mpo_core.plumbing.schemas import SCHEMA_VERSION, is_lang, is_nonempty, schema_for

MANIFEST_SUFFIX = ".manifest.json"


@dataclass(frozen=True)
class Manifest:
    """What produced an artifact and how to check it is whole."""

    kind: str
    rows: int
    content_hash: str
    schema_version: int = SCHEMA_VERSION
    config_hash: str = ""
    inputs: dict[str, str] = field(default_factory=dict)
    code_version: str = __version__
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_MANIFEST_TYPES = {"kind": str, "rows": int, "content_hash": str, "schema_version": int, "config_hash": str,
                   "inputs": dict, "code_version": str, "created_at": str, "extra": dict}


def manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + MANIFEST_SUFFIX)


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomically(path: Path, blob: bytes) -> None:
    """Write ``blob`` to a temporary file beside ``path``, fsync, rename: readers see old or new, never half."""
    tmp = _temp_path(path)
    try:
        tmp.write_bytes(blob)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """:func:`write_bytes_atomically` for UTF-8 text."""
    write_bytes_atomically(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling of ``target`` and rename it into place on success.

    A previous ``target`` is moved aside, then removed, only once the new folder is complete; on any error
    the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    build.chmod(0o755)
    try:
        yield build
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            shutil.rmtree(old)
        os.replace(build, target)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def _temp_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` and rename it onto ``path`` (atomic on POSIX)."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- validation


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int:
    return int(pc.index(mask, True).as_py())


def _where(origin: str, column: str, row: int | None = None) -> str:
    return f"{origin}: column {column!r}" + (f", row {row}" if row is not None else "")


def _first_uncastable_row(col: pa.ChunkedArray, type_: pa.DataType) -> int | None:
    """Index of the first value of ``col`` that Arrow cannot cast to ``type_`` (binary search)."""

    def casts(lo: int, hi: int) -> bool:
        try:
            col.slice(lo, hi - lo).cast(type_)
            return True
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return False

    lo, hi = 0, len(col)
    if casts(lo, hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if casts(lo, mid):
            lo = mid
        else:
            hi = mid
    return lo


def _first_valid_row(col: pa.ChunkedArray) -> int:
    return _first_true(pc.fill_null(pc.is_valid(col), False)) if col.null_count < len(col) else 0


def validate_table(table: pa.Table, kind: str, origin: str, *, row_offset: int = 0) -> None:
    """Check columns, types, nulls, empty strings and language codes of ``table`` against ``kind``.

    Raises :class:`ArtifactError` naming ``origin``, the column and the first offending row (counted from
    ``row_offset``, for batches of a larger file).
    """

    schema = schema_for(kind)
    extra = [n for n in table.column_names if n not in schema.names]
    if extra:
        raise ArtifactError(f"{origin}: unexpected column(s) {extra} for a {kind!r} artifact")
    for fld in schema:
        if fld.name not in table.column_names:
            raise ArtifactError(f"{_where(origin, fld.name)} is missing (a {kind!r} artifact needs it)")
        col = table.column(fld.name)
        if not col.type.equals(fld.type):
            bad = _first_uncastable_row(col, fld.type)
            row = row_offset + (bad if bad is not None else _first_valid_row(col))
            raise ArtifactError(f"{_where(origin, fld.name, row)}: type {col.type}, expected {fld.type}")
        if not fld.nullable and col.null_count:
            row = row_offset + _first_true(col.is_null())
            raise ArtifactError(f"{_where(origin, fld.name, row)}: null where none is allowed")
        if is_nonempty(fld) and len(col):
            blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)
            if pc.any(blank).as_py():
                row = row_offset + _first_true(pc.fill_null(blank, False))
                raise ArtifactError(f"{_where(origin, fld.name, row)}: empty string where text is required")
        if is_lang(fld) and len(col):
            for code in pc.unique(col).to_pylist():
                if code is None:
                    continue
                try:
                    ok = normalize_lang(code) == code
                except InputDataError:
                    ok = False
                if not ok:
                    row = row_offset + _first_true(pc.fill_null(pc.equal(col, code), False))
                    raise ArtifactError(
                        f"{_where(origin, fld.name, row)}: {code!r} is not a canonical ISO 639 language code"
                    )


def _row_conversion_error(rows: list[dict[str, Any]], schema: pa.Schema, origin: str) -> ArtifactError:
    """Locate the first row and column of ``rows`` that does not convert to ``schema``."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            return ArtifactError(f"{origin}: row {i} is a {type(row).__name__}, not a mapping")
        for fld in schema:
            try:
                pa.array([row.get(fld.name)], type=fld.type)
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as err:
                return ArtifactError(f"{_where(origin, fld.name, i)}: {row.get(fld.name)!r} is not {fld.type} "
                                     f"({err})")
    return ArtifactError(f"{origin}: rows do not convert to the schema")


def to_table(
    data: pa.Table | pa.RecordBatch | Iterable[dict[str, Any]] | dict[str, list], kind: str, origin: str = ""
) -> pa.Table:
    """Coerce rows (list of dicts, column dict, table or record batch) to the schema of ``kind``.

    Columns are taken by name, so order does not matter; a missing column or a value that does not convert
    is an :class:`ArtifactError` naming the column and the first offending row.
    """
    schema = schema_for(kind)
    origin = origin or f"<{kind} rows>"
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        missing = [n for n in schema.names if n not in data.column_names]
        if missing:
            raise ArtifactError(f"{origin}: missing column(s) {missing} for a {kind!r} artifact")
        columns = []
        for fld in schema:
            col = data.column(fld.name)
            try:
                columns.append(col if col.type.equals(fld.type) else col.cast(fld.type))
            except (pa.ArrowException, TypeError, ValueError) as err:
                row = _first_uncastable_row(col, fld.type)
                raise ArtifactError(f"{_where(origin, fld.name, row)}: cannot convert {col.type} to {fld.type} "
                                    f"({err})") from None
        return pa.Table.from_arrays(columns, schema=schema)
    if isinstance(data, dict):
        missing = [n for n in schema.names if n not in data]
        if missing:
            raise ArtifactError(f"{origin}: missing column(s) {missing} for a {kind!r} artifact")
        try:
            return pa.Table.from_pydict({n: data[n] for n in schema.names}, schema=schema)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            rows = [dict(zip(schema.names, values)) for values in zip(*(data[n] for n in schema.names))]
            raise _row_conversion_error(rows, schema, origin) from None
    rows = list(data)
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError, AttributeError):
        raise _row_conversion_error(rows, schema, origin) from None


# ------------------------------------------------------------------------------------------- writing


class ArtifactWriter:
    """Stream record batches into artifact ``kind`` at ``path``; atomic, validated, bounded memory.

    >>> with ArtifactWriter(path, "pairs", config_hash=h, inputs=ins) as writer:
    ...     for batch in batches:
    ...         writer.write(batch)
    >>> writer.manifest.rows

    Each :meth:`write` is validated before it reaches the file. Nothing is visible at ``path`` until the
    ``with`` block ends without an exception; on an exception the temporary file is removed and whatever
    was at ``path`` before is left as it was.
    """

    def __init__(
        self,
        path: str | Path,
        kind: str,
        *,
        config_hash: str = "",
        inputs: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        compression: str = "zstd",
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        self.schema = schema_for(kind)
        self.config_hash = config_hash
        self.inputs = dict(inputs or {})
        self.extra = dict(extra or {})
        self.compression = compression
        self.rows = 0
        self.manifest: Manifest | None = None
        self._tmp: Path | None = None
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> Self:
        self._tmp = _temp_path(self.path)
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression=self.compression)
        return self

    def write(self, data: pa.Table | pa.RecordBatch | Iterable[dict[str, Any]] | dict[str, list]) -> None:
        """Validate ``data`` (rows numbered from the rows already written) and append it."""
        if self._writer is None:
            raise ArtifactError(f"{self.path}: ArtifactWriter.write outside its 'with' block")
        origin = f"{self.path} (being written)"
        with profile.timed("io"):
            table = to_table(data, self.kind, origin)
            validate_table(table, self.kind, origin, row_offset=self.rows)
            if table.num_rows:
                self._writer.write_table(table)
        self.rows += table.num_rows

    def __exit__(self, exc_type, exc, tb) -> None:
        writer, tmp = self._writer, self._tmp
        self._writer = None
        try:
            if writer is not None:
                writer.close()
            if exc_type is None and tmp is not None:
                _publish(tmp, self.path)
                tmp = None
                self.manifest = Manifest(
                    kind=self.kind,
                    rows=self.rows,
                    content_hash=file_hash(self.path),
                    config_hash=self.config_hash,
                    inputs=self.inputs,
                    created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    extra=self.extra,
                )
                write_manifest(self.path, self.manifest)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def write_artifact(
    data: pa.Table | pa.RecordBatch | Iterable[dict[str, Any]] | dict[str, list],
    path: str | Path,
    kind: str,
    *,
    config_hash: str = "",
    inputs: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Write ``data`` as artifact ``kind`` at ``path`` atomically and return its manifest."""
    with profile.timed("io"), ArtifactWriter(path, kind, config_hash=config_hash, inputs=inputs, extra=extra) as writer:
        writer.write(data)
    assert writer.manifest is not None
    return writer.manifest


def write_manifest(path: str | Path, manifest: Manifest) -> None:
    blob = json.dumps(asdict(manifest), indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")
    write_bytes_atomically(manifest_path(path), blob)


# ------------------------------------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of the artifact at ``path``; an :class:`ArtifactError` if absent or not valid."""
    mpath = manifest_path(path)
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: manifest {mpath.name} is missing (artifact incomplete?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{mpath}: manifest is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{mpath}: manifest must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(Manifest)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ArtifactError(f"{mpath}: manifest has unknown key(s) {unknown}")
    for key, type_ in _MANIFEST_TYPES.items():
        if key in data and (not isinstance(data[key], type_) or isinstance(data[key], bool)):
            raise ArtifactError(f"{mpath}: manifest key {key!r} must be {type_.__name__}, got {data[key]!r}")
    try:
        return Manifest(**data)
    except TypeError as err:
        raise ArtifactError(f"{mpath}: manifest is not valid: {err}") from None


def artifact_is_complete(path: str | Path) -> bool:
    """True if the Parquet file and its manifest exist and the content hash matches."""
    path = Path(path)
    if not path.exists() or not manifest_path(path).exists():
        return False
    try:
        return read_manifest(path).content_hash == file_hash(path)
    except ArtifactError:
        return False


def _open_checked(path: Path, kind: str, verify_hash: bool) -> tuple[Manifest, pq.ParquetFile]:
    """Check file, manifest (kind, version, hash, row count) and Parquet footer; return both."""
    if not path.exists():
        raise ArtifactError(f"{path}: artifact file not found")
    manifest = read_manifest(path)
    if manifest.kind != kind:
        raise ArtifactError(f"{path}: expected a {kind!r} artifact, manifest says {manifest.kind!r}")
    if manifest.schema_version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema version {manifest.schema_version} != supported {SCHEMA_VERSION} (re-run its stage)"
        )
    if verify_hash and file_hash(path) != manifest.content_hash:
        raise ArtifactError(f"{path}: content hash does not match its manifest (modified or truncated)")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ArtifactError(f"{path}: not a readable Parquet file: {err}") from None
    if parquet.metadata.num_rows != manifest.rows:
        raise ArtifactError(
            f"{path}: holds {parquet.metadata.num_rows} rows, its manifest says {manifest.rows}"
        )
    return manifest, parquet


def read_artifact(path: str | Path, kind: str, *, verify_hash: bool = True) -> pa.Table:
    """Read and validate artifact ``kind`` at ``path`` (manifest, hash, schema, nulls, codes)."""
    path = Path(path)
    with profile.timed("io"):
        _, parquet = _open_checked(path, kind, verify_hash)
        try:
            table = parquet.read()
        except (pa.ArrowException, OSError) as err:
            raise ArtifactError(f"{path}: Parquet data is corrupt: {err}") from None
        validate_table(table, kind, str(path))
    return table


def iter_batches(
    path: str | Path, kind: str, batch_size: int = 65536, *, verify_hash: bool = True
) -> Iterator[pa.RecordBatch]:
    """Stream a validated artifact in record batches (bounded memory); errors give absolute row numbers."""
    path = Path(path)
    _, parquet = _open_checked(path, kind, verify_hash)
    offset = 0
    batches = parquet.iter_batches(batch_size=batch_size)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise ArtifactError(f"{path}: Parquet data is corrupt after row {offset}: {err}") from None
        validate_table(pa.Table.from_batches([batch]), kind, str(path), row_offset=offset)
        offset += batch.num_rows
        yield batch

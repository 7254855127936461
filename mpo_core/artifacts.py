"""Artifact I/O: Parquet files with a JSON manifest beside them, written atomically.

``<name>.parquet`` holds the rows; ``<name>.parquet.manifest.json`` holds the row count, a content hash,
the schema version, the hash of the config that produced it, the content hashes of its inputs and the code
version. A write goes to a temporary file in the same folder and is renamed into place, Parquet first and
manifest last, so a crash never leaves an artifact that looks complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from mpo_core import __version__
from mpo_core.errors import ArtifactError
from mpo_core.schemas import SCHEMA_VERSION, schema_for

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


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_table(data: pa.Table | Iterable[dict[str, Any]] | dict[str, list], kind: str) -> pa.Table:
    """Coerce rows (list of dicts, column dict or table) to the schema of ``kind``."""
    schema = schema_for(kind)
    if isinstance(data, pa.Table):
        missing = [n for n in schema.names if n not in data.column_names]
        if missing:
            raise ArtifactError(f"{kind}: missing column(s) {missing}")
        return data.select(schema.names).cast(schema)
    if isinstance(data, dict):
        return pa.Table.from_pydict({n: data[n] for n in schema.names}, schema=schema)
    rows = list(data)
    return pa.Table.from_pylist(rows, schema=schema)


def write_artifact(
    data: pa.Table | Iterable[dict[str, Any]] | dict[str, list],
    path: str | Path,
    kind: str,
    *,
    config_hash: str = "",
    inputs: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Write ``data`` as artifact ``kind`` at ``path`` atomically and return its manifest."""
    path = Path(path)
    table = to_table(data, kind)
    _atomic_write_bytes(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    manifest = Manifest(
        kind=kind,
        rows=table.num_rows,
        content_hash=file_hash(path),
        config_hash=config_hash,
        inputs=dict(inputs or {}),
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        extra=dict(extra or {}),
    )
    write_manifest(path, manifest)
    return manifest


def write_manifest(path: str | Path, manifest: Manifest) -> None:
    blob = json.dumps(asdict(manifest), indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")

    def _write(tmp: str) -> None:
        Path(tmp).write_bytes(blob)

    _atomic_write_bytes(manifest_path(path), _write)


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of the artifact at ``path``; an :class:`ArtifactError` if absent or unreadable."""
    mpath = manifest_path(path)
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
        return Manifest(**data)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: manifest {mpath.name} is missing (artifact incomplete?)") from None
    except (json.JSONDecodeError, TypeError) as err:
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


def read_artifact(path: str | Path, kind: str, *, verify_hash: bool = True) -> pa.Table:
    """Read and validate artifact ``kind`` at ``path`` (manifest, hash, schema, nulls)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: artifact file not found")
    manifest = read_manifest(path)
    if manifest.kind != kind:
        raise ArtifactError(f"{path}: expected a {kind!r} artifact, manifest says {manifest.kind!r}")
    if manifest.schema_version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema version {manifest.schema_version} != supported {SCHEMA_VERSION}"
        )
    if verify_hash and file_hash(path) != manifest.content_hash:
        raise ArtifactError(f"{path}: content hash does not match its manifest (modified or truncated)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise ArtifactError(f"{path}: not a readable Parquet file: {err}") from None
    validate_table(table, kind, str(path))
    return table


def validate_table(table: pa.Table, kind: str, origin: str) -> None:
    """Check columns, types and nulls of ``table`` against the schema of ``kind``."""
    schema = schema_for(kind)
    for fld in schema:
        if fld.name not in table.column_names:
            raise ArtifactError(f"{origin}: column {fld.name!r} is missing")
        col = table.column(fld.name)
        if not col.type.equals(fld.type):
            raise ArtifactError(
                f"{origin}: column {fld.name!r} has type {col.type}, expected {fld.type}"
            )
        if not fld.nullable and col.null_count:
            row = next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
            raise ArtifactError(f"{origin}: column {fld.name!r} has a null at row {row}")


def iter_batches(path: str | Path, kind: str, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
    """Stream a validated artifact in record batches (bounded memory)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.kind != kind:
        raise ArtifactError(f"{path}: expected a {kind!r} artifact, manifest says {manifest.kind!r}")
    pf = pq.ParquetFile(path)
    offset = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        validate_table(pa.Table.from_batches([batch]), kind, f"{path} (rows {offset}..)")
        offset += batch.num_rows
        yield batch

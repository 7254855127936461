"""Every artifact column is documented: ``docs/artifacts.md`` is generated from the schemas and their
descriptions, and every kind written as a real Parquet artifact opens with ``pandas.read_parquet`` with exactly
the documented columns."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from mpo_core.plumbing.artifact_docs import PAGE, artifact_files, render
from mpo_core.plumbing.artifacts import read_manifest, write_artifact
from mpo_core.plumbing.schemas import COLUMN_DOCS, SCHEMAS, is_lang


def test_every_column_of_every_kind_has_a_one_line_description():
    assert set(COLUMN_DOCS) == set(SCHEMAS)
    assert all(artifact_files(kind) for kind in SCHEMAS)
    for kind, schema in SCHEMAS.items():
        undocumented = [name for name in schema.names if name not in COLUMN_DOCS[kind]]
        assert not undocumented, f"{kind}: no description for {undocumented}"
        assert set(COLUMN_DOCS[kind]) == set(schema.names), f"{kind}: descriptions of columns it does not have"
        for column, text in COLUMN_DOCS[kind].items():
            assert text.strip() and "\n" not in text, f"{kind}.{column}: {text!r}"


def test_the_page_is_current():
    assert PAGE.read_text(encoding="utf-8") == render(), (
        "docs/artifacts.md is stale: run `python -m mpo_core.plumbing.artifact_docs`")


def _value(field: pa.Field):
    """A valid value of ``field``'s type."""
    if pa.types.is_list(field.type):
        return [0.25, -0.5]
    if pa.types.is_string(field.type):
        return "en" if is_lang(field) else f"some {field.name}"
    if pa.types.is_boolean(field.type):
        return True
    return 1 if pa.types.is_integer(field.type) else 0.5


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_every_kind_opens_with_pandas_with_the_documented_columns(kind, tmp_path):
    row = {field.name: _value(field) for field in SCHEMAS[kind]}
    path = tmp_path / f"{kind}.parquet"
    write_artifact([row, row], path, kind)
    frame = pd.read_parquet(path)
    assert list(frame.columns) == SCHEMAS[kind].names and set(frame.columns) == set(COLUMN_DOCS[kind])
    assert len(frame) == 2 and frame.iloc[0].to_dict().keys() == row.keys()


def assert_artifacts_documented(run_dir: Path) -> set[str]:
    """Every Parquet artifact of a finished run lies where ``docs/artifacts.md`` says its kind lies, and opens
    with pandas with the documented columns; returns the kinds found."""
    kinds = set()
    for path in sorted(Path(run_dir).rglob("*.parquet")):
        kind = read_manifest(path).kind
        where = path.relative_to(run_dir).as_posix()
        patterns = [re.sub(r"<[^>]+>", "*", name) for name in artifact_files(kind)]
        assert any(fnmatch.fnmatch(where, p) for p in patterns), f"{where} ({kind}) is not in docs/artifacts.md"
        assert set(pd.read_parquet(path).columns) == set(COLUMN_DOCS[kind]), where
        kinds.add(kind)
    return kinds

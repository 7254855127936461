"""Artifact I/O: round trips, the streaming writer, atomicity, manifests, batch reading."""

from __future__ import annotations

import pyarrow as pa

from mpo_core.plumbing.artifacts import (
    ArtifactWriter,
    artifact_is_complete,
    file_hash,
    iter_batches,
    manifest_path,
    read_artifact,
    read_manifest,
    write_artifact,
)
from mpo_core.plumbing.schemas import SCHEMA_VERSION, SCHEMAS


def prompt_row(i: int, **changes) -> dict:
    row = {"prompt_id": f"p{i}", "lang": "en", "text": f"prompt number {i}", "category": None,
           "split": "train", "source": "test", "translated_by": "original", "harmful": True}
    row.update(changes)
    return row


def test_round_trip_keeps_rows_and_writes_a_manifest(tmp_path):
    path = tmp_path / "prompts.parquet"
    rows = [prompt_row(i, lang=lang) for i, lang in enumerate(["en", "zh", "sw", "fil"])]
    manifest = write_artifact(rows, path, "prompts", config_hash="abc", inputs={"src": "123"}, extra={"n": 4})
    assert manifest.rows == 4 and manifest.kind == "prompts" and manifest.schema_version == SCHEMA_VERSION
    assert manifest.content_hash == file_hash(path)
    assert read_manifest(path) == manifest
    assert read_artifact(path, "prompts").to_pylist() == rows
    assert artifact_is_complete(path)


def test_column_dict_table_and_record_batch_inputs_are_accepted(tmp_path):
    table = pa.Table.from_pylist([prompt_row(0), prompt_row(1)]).select(
        ["text", "prompt_id", "lang", "category", "split", "source", "translated_by", "harmful"])
    write_artifact(table, tmp_path / "a.parquet", "prompts")  # column order does not matter
    write_artifact(table.to_pydict(), tmp_path / "b.parquet", "prompts")
    write_artifact(table.to_batches()[0], tmp_path / "c.parquet", "prompts")
    for name in "abc":
        assert read_artifact(tmp_path / f"{name}.parquet", "prompts").num_rows == 2


def test_streaming_writer_writes_batches_and_reads_back_in_batches(tmp_path):
    path = tmp_path / "big.parquet"
    with ArtifactWriter(path, "prompts", config_hash="h") as writer:
        for start in range(0, 10_000, 2_500):
            writer.write([prompt_row(i) for i in range(start, start + 2_500)])
        assert not path.exists(), "nothing is visible before the block ends"
    assert writer.manifest.rows == 10_000 and read_manifest(path).config_hash == "h"
    batches = list(iter_batches(path, "prompts", batch_size=3_000))
    assert [b.num_rows for b in batches] == [3_000, 3_000, 3_000, 1_000]
    assert batches[-1].column("prompt_id")[-1].as_py() == "p9999"


def test_empty_writer_gives_a_valid_empty_artifact(tmp_path):
    path = tmp_path / "empty.parquet"
    with ArtifactWriter(path, "dropped"):
        pass
    assert read_artifact(path, "dropped").num_rows == 0


def test_rewrite_replaces_atomically_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "p.parquet"
    write_artifact([prompt_row(0)], path, "prompts")
    write_artifact([prompt_row(1), prompt_row(2)], path, "prompts")
    assert read_artifact(path, "prompts").num_rows == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet", manifest_path(path).name]


def test_every_schema_has_an_empty_table_that_round_trips(tmp_path):
    for kind, schema in SCHEMAS.items():
        path = tmp_path / f"{kind}.parquet"
        write_artifact(schema.empty_table(), path, kind)
        assert read_artifact(path, kind).schema.equals(schema, check_metadata=False)

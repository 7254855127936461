"""Broken inputs, one of each kind, across artifacts and every ingest format.

Each must raise the project's named error, whose message names the file, and the column (or field) and
the first offending row where the failure has them; and none may leave a partial artifact behind: a failed
write leaves no file and no manifest, and a good artifact already at that path untouched.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mpo_core.plumbing.artifacts import (
    ArtifactWriter,
    file_hash,
    manifest_path,
    read_artifact,
    read_manifest,
    write_artifact,
    write_manifest,
)
from mpo_core.plumbing.config import config_from_dict
from mpo_core.plumbing.errors import ArtifactError, InputDataError
from mpo_core.plumbing.schemas import PROMPTS
from mpo_core.plumbing.stage_run import run_stage_function
from mpo_core.readers.pairs import load_pairs


def prompt_row(i: int, **changes) -> dict:
    row = {"prompt_id": f"p{i}", "lang": "en", "text": f"prompt {i}", "category": None, "split": "train",
           "source": "test", "translated_by": "original", "harmful": True}
    row.update(changes)
    return row


def assert_names(err: Exception, path: Path, column: str | None = None, row: int | None = None) -> None:
    message = str(err)
    assert str(path) in message, message
    if column is not None:
        assert repr(column) in message, message
    if row is not None:
        assert f"row {row}" in message, message


@pytest.fixture
def good(tmp_path) -> Path:
    """A good prompts artifact whose bytes must survive every failed rewrite."""
    path = tmp_path / "prompts.parquet"
    write_artifact([prompt_row(i) for i in range(5)], path, "prompts")
    return path


def assert_untouched(path: Path, before: tuple[bytes, bytes]) -> None:
    assert (path.read_bytes(), manifest_path(path).read_bytes()) == before
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []


def snapshot(path: Path) -> tuple[bytes, bytes]:
    return path.read_bytes(), manifest_path(path).read_bytes()


# ----------------------------------------------------------------------------- writing artifacts


@pytest.mark.parametrize(
    ("case", "column", "row"),
    [
        ("wrong_type", "harmful", 3),  # a value that does not convert
        ("null", "split", 2),  # null in a non-nullable column
        ("blank_text", "text", 4),  # whitespace-only where text is required
        ("unknown_lang", "lang", 1),  # not an ISO 639 code
        ("non_canonical_lang", "lang", 3),  # ISO 639-3 where the 639-1 code exists
    ],
)
def test_bad_rows_are_refused_and_the_existing_artifact_survives(good, case, column, row):
    rows = [prompt_row(i) for i in range(5)]
    rows[row] = {
        "wrong_type": prompt_row(row, harmful="yes"),
        "null": prompt_row(row, split=None),
        "blank_text": prompt_row(row, text="  \n "),
        "unknown_lang": prompt_row(row, lang="xx"),
        "non_canonical_lang": prompt_row(row, lang="zho"),
    }[case]
    before = snapshot(good)
    with pytest.raises(ArtifactError) as err:
        write_artifact(rows, good, "prompts")
    assert_names(err.value, good, column, row)
    assert_untouched(good, before)


def test_missing_column_in_a_table_is_refused(good):
    table = pa.Table.from_pylist([prompt_row(0)]).drop_columns(["source"])
    before = snapshot(good)
    with pytest.raises(ArtifactError) as err:
        write_artifact(table, good, "prompts")
    assert_names(err.value, good, None)
    assert "source" in str(err.value)
    assert_untouched(good, before)


def test_streaming_writer_failing_in_a_later_batch_leaves_nothing(tmp_path, good):
    new = tmp_path / "new.parquet"
    with pytest.raises(ArtifactError) as err, ArtifactWriter(new, "prompts") as writer:
        writer.write([prompt_row(i) for i in range(100)])
        writer.write([prompt_row(100), prompt_row(101, prompt_id="")])
    assert_names(err.value, new, "prompt_id", 101)  # row counted across batches
    assert not new.exists() and not manifest_path(new).exists()
    before = snapshot(good)
    with pytest.raises(RuntimeError), ArtifactWriter(good, "prompts") as writer:
        writer.write([prompt_row(9)])
        raise RuntimeError("the stage crashed half way")
    assert_untouched(good, before)


# ----------------------------------------------------------------------------- reading artifacts


def test_truncated_parquet_file_fails_its_hash(good):
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="hash does not match") as err:
        read_artifact(good, "prompts")
    assert_names(err.value, good)


def test_corrupt_parquet_with_a_matching_manifest_is_not_readable(good):
    good.write_bytes(b"PAR1" + b"\x00" * 64)
    write_manifest(good, read_manifest(good).__class__(**{**read_manifest(good).__dict__,
                                                          "content_hash": file_hash(good)}))
    with pytest.raises(ArtifactError, match="not a readable Parquet") as err:
        read_artifact(good, "prompts")
    assert_names(err.value, good)


def test_missing_manifest(good):
    manifest_path(good).unlink()
    with pytest.raises(ArtifactError, match="manifest .* is missing") as err:
        read_artifact(good, "prompts")
    assert_names(err.value, good)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: "{not json", "not valid JSON"),
        (lambda m: json.dumps({**m, "kind": "pairs"}), "expected a 'prompts' artifact"),
        (lambda m: json.dumps({**m, "schema_version": 99}), "schema version 99"),
        (lambda m: json.dumps({**m, "rows": 6}), "its manifest says 6"),
        (lambda m: json.dumps({**m, "rows": "5"}), "'rows' must be int"),
        (lambda m: json.dumps({**m, "surprise": 1}), "unknown key"),
    ],
    ids=["corrupt-json", "wrong-kind", "wrong-schema-version", "row-count", "wrong-field-type", "unknown-key"],
)
def test_bad_manifests(good, edit, message):
    mpath = manifest_path(good)
    mpath.write_text(edit(json.loads(mpath.read_text())))
    with pytest.raises(ArtifactError, match=message) as err:
        read_artifact(good, "prompts")
    assert str(good) in str(err.value)


def _forge(path: Path, table: pa.Table) -> None:
    """A Parquet file written behind the artifact layer's back, with a manifest that matches its bytes."""
    pq.write_table(table, path)
    write_manifest(path, read_manifest(path).__class__(kind="prompts", rows=table.num_rows,
                                                       content_hash=file_hash(path)))


def test_forged_file_with_a_wrong_column_type_names_column_and_row(good):
    rows = [prompt_row(i) for i in range(4)]
    table = pa.Table.from_pylist(rows, schema=PROMPTS)
    table = table.set_column(table.schema.get_field_index("harmful"), "harmful",
                             pa.array(["true", "false", "maybe", "true"]))
    _forge(good, table)
    with pytest.raises(ArtifactError) as err:
        read_artifact(good, "prompts")
    assert_names(err.value, good, "harmful", 2)


def test_forged_file_with_a_missing_column_names_it(good):
    _forge(good, pa.Table.from_pylist([prompt_row(0)], schema=PROMPTS).drop_columns(["translated_by"]))
    with pytest.raises(ArtifactError, match="is missing") as err:
        read_artifact(good, "prompts")
    assert_names(err.value, good, "translated_by")


def test_forged_file_with_a_null_names_the_first_null_row_while_streaming(good):
    from mpo_core.plumbing.artifacts import iter_batches

    rows = [prompt_row(i) for i in range(10)]
    table = pa.Table.from_pylist(rows, schema=PROMPTS.set(0, PROMPTS.field(0).with_nullable(True)))
    table = table.set_column(0, "prompt_id", pa.array([f"p{i}" if i != 7 else None for i in range(10)]))
    _forge(good, table)
    with pytest.raises(ArtifactError) as err:
        list(iter_batches(good, "prompts", batch_size=4))
    assert_names(err.value, good, "prompt_id", 7)


# ----------------------------------------------------------------------------- ingest formats


def _ingest(tmp_path: Path, source: Path, **prompts) -> Path:
    """Run the ingest stage on ``source``; assert it left no artifact when it fails."""
    out_dir = tmp_path / "ingest"
    config = config_from_dict({"prompts": {"source": str(source), **prompts}})
    try:
        return run_stage_function("ingest", config, {}, out_dir)["prompts"]
    except Exception:
        assert not (out_dir / "prompts.parquet").exists()
        assert not out_dir.exists() or not any(out_dir.iterdir())
        raise


def _mpo_record(**changes) -> dict:
    record = {
        "source_conversations": [{"from": "human", "value": "How do I pick a lock?"}],
        "source_chosen": {"from": "gpt", "value": "I can't help with that."},
        "source_rejected": {"from": "gpt", "value": "Use a tension wrench and a pick."},
        "target_conversations": [{"from": "human", "value": "我怎样才能撬锁？"}],
        "target_chosen": {"from": "gpt", "value": "我无法帮助你。"},
        "target_rejected": {"from": "gpt", "value": "使用张力扳手和撬锁工具。"},
    }
    record.update(changes)
    return record


def test_mpo_json_that_is_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"source_conversations": [')
    with pytest.raises(InputDataError, match="not valid JSON") as err:
        load_pairs(path)
    assert_names(err.value, path)


@pytest.mark.parametrize(
    ("record", "column"),
    [
        (lambda r: r.pop("target_chosen") and r, "target_chosen"),  # field missing
        (lambda r: {**r, "source_chosen": {"from": "human", "value": "x"}}, "source_chosen"),  # wrong role
        (lambda r: {**r, "target_conversations": [{"from": "human", "value": "q"},
                                                  {"from": "gpt", "value": "a"}]}, "target_conversations"),
        (lambda r: {**r, "source_conversations": [{"from": "human", "value": 42}]}, "source_conversations"),
    ],
    ids=["missing-field", "answer-from-human", "conversation-ends-with-gpt", "text-not-a-string"],
)
def test_mpo_json_bad_record_names_file_field_and_row(tmp_path, record, column):
    records = [_mpo_record() for _ in range(4)]
    records[2] = record(_mpo_record())
    path = tmp_path / "bad_mpo.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    with pytest.raises(InputDataError) as err:
        _ingest(tmp_path, path)
    assert_names(err.value, path, column, 2)


def test_multijail_csv_with_an_empty_translation(tmp_path):
    path = tmp_path / "multijail.csv"
    path.write_text("\ufeffid,source,tags,en,zh,sw\n0,x,['a'],Hello there,你好,Habari\n"
                    "1,x,['b'],How are you,,Habari yako\n", encoding="utf-8")
    with pytest.raises(InputDataError) as err:
        _ingest(tmp_path, path)
    assert_names(err.value, path, "zh", 1)


def test_hh_rlhf_line_that_is_not_json(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    good = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"})
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(good + "\n" + good + "\n{chosen: oops}\n")
    with pytest.raises(InputDataError, match="not valid JSON") as err:
        load_pairs(path)
    assert_names(err.value, path, None, 2)


def test_hh_rlhf_record_that_is_not_a_dialogue(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": "just some text", "rejected": "other text"}) + "\n")
    with pytest.raises(InputDataError, match="not an HH-RLHF dialogue") as err:
        load_pairs(path, "hh_rlhf")
    assert_names(err.value, path, "chosen", 0)


def test_plain_csv_without_a_language_column(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt_id,text\n1,How do I pick a lock?\n")
    with pytest.raises(InputDataError, match="column 'lang' is missing") as err:
        _ingest(tmp_path, path)
    assert_names(err.value, path, "lang")


def test_plain_csv_with_an_unknown_language_code(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt_id,lang,text\n1,en,How do I pick a lock?\n2,klingon,nuqneH\n")
    with pytest.raises(InputDataError, match="unknown language code 'klingon'") as err:
        _ingest(tmp_path, path)
    assert_names(err.value, path, "lang", 1)


def test_plain_jsonl_with_a_bad_flag_and_a_bad_split(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"lang": "en", "text": "a"}, {"lang": "en", "text": "b", "harmful": "perhaps"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(InputDataError, match="expected true/false") as err:
        _ingest(tmp_path, path)
    assert_names(err.value, path, "harmful", 1)
    lines[1] = {"lang": "en", "text": "b", "split": "test"}
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(InputDataError, match="split must be train or eval") as err:
        _ingest(tmp_path, path)
    assert_names(err.value, path, "split", 1)


def test_plain_parquet_prompt_set_that_is_corrupt(tmp_path):
    path = tmp_path / "prompts.parquet"
    path.write_bytes(b"PAR1 definitely not parquet PAR1")
    with pytest.raises(InputDataError, match="not a readable Parquet") as err:
        _ingest(tmp_path, path)
    assert_names(err.value, path)


def test_missing_input_file(tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(InputDataError, match="input file not found") as err:
        _ingest(tmp_path, path)
    assert_names(err.value, path)

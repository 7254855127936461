"""The input readers are Arrow's (``pyarrow.json`` for JSON lines, ``pyarrow.csv`` for CSV headers and MGSM's
TSV): what a hand-written splitter got wrong is read right, and what Arrow refuses is still named by file,
column and row."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mpo_core.plumbing.config import PromptsConfig
from mpo_core.plumbing.errors import InputDataError
from mpo_core.readers.files import csv_header, detect_format, read_json_lines
from mpo_core.readers.prompts import load_prompts
from mpo_core.readers.utility import load_mgsm, load_multiple_choice


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_json_lines_keep_escapes_types_and_skip_blank_lines(tmp_path):
    records = [{"prompt_id": "a", "text": "caf\u00e9 \"quoted\"\nnext line", "lang": "fr", "harmful": False},
               {"prompt_id": "b", "text": "a line \u2028 separator inside", "lang": "en"}]
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n" + json.dumps(records[0]) + "\n\n\n" + json.dumps(records[1], ensure_ascii=False) + "\n")
    assert read_json_lines(path) == records  # no field the record lacks, no None filled in
    rows = load_prompts(PromptsConfig(source=str(path))).to_pylist()
    assert [(r["prompt_id"], r["text"], r["harmful"]) for r in rows] == [
        ("a", records[0]["text"], False), ("b", records[1]["text"], True)]


def test_a_field_whose_json_type_changes_is_named(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"text": "x", "lang": "en", "harmful": true}\n\n'
                                        '{"text": "y", "lang": "en", "harmful": "perhaps"}\n')
    with pytest.raises(InputDataError) as err:
        load_prompts(PromptsConfig(source=str(path)))
    assert str(err.value) == (f"{path}: column 'harmful', row 1: a JSON string where row 0 holds a boolean; give "
                              "a field one type in every row")


def test_a_json_line_that_is_not_an_object_is_named(tmp_path):
    path = _write(tmp_path / "mc_en.jsonl", '{"question": "q", "options": ["a", "b"], "answer": 0}\n[1, 2]\n')
    with pytest.raises(InputDataError) as err:
        load_multiple_choice(str(path))
    assert str(err.value) == f"{path}: row 1 is not a JSON object"


def test_csv_header_is_read_by_arrow(tmp_path):
    assert csv_header('"id","a, b" ,en\n1,2,3\n') == ["id", "a, b", "en"]
    assert csv_header("") == []
    wide = _write(tmp_path / "w.csv", '"id","en","sw"\n1,"How, then?",Vipi?\n')
    assert detect_format(wide) == "multijail"


def test_mgsm_keeps_quotes_and_numbers_items_by_line(tmp_path):
    path = _write(tmp_path / "mgsm_en.tsv", 'She said "two" apples, then "one"?\t3\n\n  \nWhat is 1,000 + 1?\t1001\n')
    items = load_mgsm(str(path), ["en"], None)
    assert [(i["prompt_id"], i["text"], i["gold"]) for i in items] == [
        ("mgsm-en-0001", 'She said "two" apples, then "one"?', 3), ("mgsm-en-0004", "What is 1,000 + 1?", 1001)]
    _write(path, "What is 1+1?\t2\n\nno answer column here\n")
    with pytest.raises(InputDataError) as err:
        load_mgsm(str(path), ["en"], None)
    assert str(err.value) == f"{path}: line 3: expected 'question<TAB>answer', got 1 column(s)"

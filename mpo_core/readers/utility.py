"""Utility evaluation sets: MGSM (``mgsm_<lang>.tsv``, a folder of them, or the hub id) and M-MMLU-style
multiple choice (CSV/JSONL); a bad line or row is an :class:`InputDataError` naming file, line and column.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from mpo_core.plumbing.errors import InputDataError
from mpo_core.readers.files import read_csv_records, read_json_lines, read_text
from mpo_core.results.metrics import (
    parse_gold_answer,
)

MGSM_HUB_ID = "juletxara/mgsm"
MGSM_LANGS = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")


def _mgsm_lines(path: Path) -> list[tuple[int, str, str]]:
    """``(line number, question, answer)`` of MGSM's ``question<TAB>answer`` lines, read by Arrow's CSV reader
    (tab-separated, no quoting: a question keeps its quotes); blank lines are skipped, a line without exactly
    one tab is an :class:`InputDataError` naming it."""
    import pyarrow.csv as pacsv

    blank_lines, bad_rows = set(), []

    def on_bad_row(row) -> str:
        if row.text.strip():
            bad_rows.append(row)
        else:
            blank_lines.add(row.number)
        return "skip"

    table = pacsv.read_csv(  # every line counts in Arrow's row numbers: an empty one is a row of empty fields
        io.BytesIO(read_text(path).encode("utf-8")),
        read_options=pacsv.ReadOptions(use_threads=False, column_names=["question", "answer"]),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=False,
                                         invalid_row_handler=on_bad_row),
        convert_options=pacsv.ConvertOptions(column_types={"question": pa.string(), "answer": pa.string()},
                                             strings_can_be_null=False),
    )
    if bad_rows:
        raise InputDataError(f"{path}: line {bad_rows[0].number}: expected 'question<TAB>answer', got "
                             f"{bad_rows[0].actual_columns} column(s)")
    line_numbers = (n for n in range(1, table.num_rows + len(blank_lines) + 1) if n not in blank_lines)
    return [(line_no, question, answer)
            for line_no, question, answer in zip(line_numbers, *table.to_pydict().values())
            if question.strip() or answer.strip()]


def _read_mgsm_tsv(path: Path, lang: str, limit: int | None) -> list[dict]:
    """MGSM items ``mgsm-<lang>-<line>`` of one file (:func:`_mgsm_lines`); a bad answer is named (file, line,
    column)."""
    items = []
    for line_no, question, answer in _mgsm_lines(path)[:limit]:
        try:
            gold = parse_gold_answer(answer)
        except ValueError as err:
            raise InputDataError(f"{path}: line {line_no}, column 'answer': {err}") from None
        items.append({"prompt_id": f"mgsm-{lang}-{line_no:04d}", "lang": lang, "text": question, "gold": gold})
    return items


def load_mgsm(source: str, langs: Sequence[str], limit: int | None) -> list[dict]:
    """MGSM items in ``langs`` from a folder of ``mgsm_<lang>.tsv``, one such file, or the hub id
    ``juletxara/mgsm`` (downloaded with ``huggingface_hub`` for users online)."""
    path = Path(source)
    if path.is_file():
        match = re.fullmatch(r"mgsm_([a-z]{2,3})\.tsv", path.name)
        if match is None:
            raise InputDataError(f"{path}: an MGSM file must be named mgsm_<lang>.tsv")
        return _read_mgsm_tsv(path, match.group(1), limit) if match.group(1) in langs else []
    wanted = [lang for lang in langs if lang in MGSM_LANGS]
    if path.is_dir():
        return [item for lang in wanted if (path / f"mgsm_{lang}.tsv").is_file()
                for item in _read_mgsm_tsv(path / f"mgsm_{lang}.tsv", lang, limit)]
    if source == MGSM_HUB_ID:
        from huggingface_hub import hf_hub_download

        return [item for lang in wanted for item in _read_mgsm_tsv(
            Path(hf_hub_download(MGSM_HUB_ID, f"mgsm_{lang}.tsv", repo_type="dataset")), lang, limit)]
    raise InputDataError(f"MGSM source {source!r} is neither a file, a folder nor the hub id {MGSM_HUB_ID!r}")


_MC_LETTERS = "ABCDEFGH"
_MC_LANG_FROM_NAME = re.compile(r"_([A-Za-z]{2,3})(?:[_-][A-Za-z]{2,4})?$")


def _mc_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        return read_csv_records(path)[1]
    if path.suffix in (".jsonl", ".json"):
        return read_json_lines(path)
    raise InputDataError(f"{path}: multiple-choice files must be .csv or .jsonl")


def load_multiple_choice(source: str) -> list[dict]:
    """M-MMLU-style items: CSV/JSONL rows with a question (``question``/``Question``), options as columns
    ``A``..``D`` (or an ``options`` list) and the answer as a letter or an index (``answer``/``Answer``). The
    language is a ``lang`` column or the file name's suffix (``mmlu_ZH_CN.csv`` -> ``zh``)."""
    path = Path(source)
    name_lang = _MC_LANG_FROM_NAME.search(path.stem)
    items = []
    for row_no, row in enumerate(_mc_rows(path), 1):
        where = f"{path}: row {row_no}"
        lang = row.get("lang") or (name_lang.group(1).lower() if name_lang else None)
        if not lang:
            raise InputDataError(f"{where}: no 'lang' column and no language in the file name")
        question = row.get("question", row.get("Question"))
        options = row.get("options") or [row[c] for c in _MC_LETTERS if row.get(c) not in (None, "")]
        answer = row.get("answer", row.get("Answer"))
        if not question or len(options) < 2:
            raise InputDataError(f"{where}: column 'question' and at least two options are required")
        if isinstance(answer, str) and answer.strip().upper() in _MC_LETTERS[: len(options)]:
            answer = _MC_LETTERS.index(answer.strip().upper())
        if not isinstance(answer, int) or not 0 <= answer < len(options):
            raise InputDataError(f"{where}, column 'answer': {answer!r} is not an option letter or index")
        items.append({"lang": lang, "question": str(question), "options": [str(o) for o in options],
                      "answer": answer})
    return items

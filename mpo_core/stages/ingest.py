"""Ingest: real data formats in, ``prompts`` (and, for ready-made quadruples, ``pairs``) tables out.

Formats (``prompts.format``; ``auto`` decides from the file name and its first record):

- ``seed``: the project's own seed set (:func:`mpo_core.plumbing.seed.load_seed_prompts`).
- ``mpo_json``: the MPO paper's released quadruples, LLaMA-Factory "ranking" JSON: a list of records with
  ``source_conversations`` / ``source_chosen`` / ``source_rejected`` (dominant language) and the same with
  ``target_``. The file names no language: they are identified (:mod:`mpo_core.common.langid`), see
  :func:`infer_pair_languages`. The dominant language is data: the paper's Qwen file is Chinese-dominant.
- ``multijail``: MultiJail-style wide CSV (UTF-8 BOM allowed), one text column per language code.
- ``hh_rlhf``: Anthropic HH-RLHF dialogues (``.jsonl`` or ``.jsonl.gz``, ``{"chosen", "rejected"}``), split
  into prompt (the dialogue up to the last Assistant turn both share) and the two final answers.
- ``parquet`` / ``csv`` / ``jsonl``: a plain prompt set with a text column and a language column.

A source ``hf://<repo_id>/<file>`` is fetched from the Hugging Face hub (dataset repos) for users who are
online; nothing else touches the network. CSV and JSON lines are read by Arrow's readers (``pyarrow.csv``,
``pyarrow.json``). Every bad row is an :class:`InputDataError` naming file, column (or field) and row.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import hashlib
import io
import json
import unicodedata
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path
from typing import Any

import pyarrow as pa

from mpo_core.common.langid import identify
from mpo_core.plumbing.config import PipelineConfig, PromptsConfig
from mpo_core.plumbing.errors import InputDataError
from mpo_core.plumbing.languages import is_valid_lang, normalize_lang
from mpo_core.plumbing.schemas import PAIRS, PROMPTS
from mpo_core.plumbing.seed import load_seed_prompts, seed_path
from mpo_core.plumbing.stage_run import Artifact, StageRun

MULTIJAIL_HUB_ID = "DAMO-NLP-SG/MultiJail"
MULTIJAIL_HUB_SOURCE = "hf://DAMO-NLP-SG/MultiJail/MultiJail.csv"

HUB_PREFIX = "hf://"
_MPO_FIELDS = ("source_conversations", "source_chosen", "source_rejected",
               "target_conversations", "target_chosen", "target_rejected")
_HH_HUMAN = "\n\nHuman:"
_HH_ASSISTANT = "\n\nAssistant:"


def content_id(*parts: str, prefix: str = "", length: int = 16) -> str:
    """A stable id: ``prefix`` + the first ``length`` hex digits of sha256 over ``parts``."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return prefix + digest[:length]


def assign_split(prompt_id: str, eval_fraction: float, seed: int = 0) -> str:
    """``eval`` for a stable pseudo-random ``eval_fraction`` of prompt ids, else ``train``."""
    if eval_fraction <= 0.0:
        return "train"
    bucket = int(hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()[:8], 16) / 0x100000000
    return "eval" if bucket < eval_fraction else "train"


# ------------------------------------------------------------------------------------------ sources


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


def _where(path: Path, column: str, row: int) -> str:
    return f"{path}: column {column!r}, row {row}"


def is_visible(text: str) -> bool:
    """True if ``text`` has a character that shows: not whitespace, a control or a format character
    (zero-width space U+200B, joiners, BOM, direction marks)."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Zs") for ch in text)


def _text(value: Any, path: Path, column: str, row: int, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InputDataError(f"{_where(path, column, row)}: expected text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InputDataError(f"{_where(path, column, row)}: empty text")
    if not allow_empty and not is_visible(value):
        raise InputDataError(
            f"{_where(path, column, row)}: text has only invisible characters "
            f"({', '.join(sorted({f'U+{ord(c):04X}' for c in value if not c.isspace()}))})"
        )
    return value


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
                f"{_where(self.path, column, row)}: prompt {prompt_id!r} in language {lang!r} has another text "
                f"in row {earlier_row}; each (id, language) must have one text"
            )
        return False


# ------------------------------------------------------------------------------------------ dialogues


def render_dialogue(turns: list[tuple[str, str]]) -> str:
    """A prompt from ``(role, text)`` turns: the text itself for one user turn, else a transcript.

    The transcript (``Human: ...\\n\\nAssistant: ...\\n\\nHuman: ...``) keeps earlier turns as context in a
    single user message, which is how the pipeline's chat template receives a prompt.
    """
    if len(turns) == 1 and turns[0][0] == "human":
        return turns[0][1].strip()
    labels = {"human": "Human", "gpt": "Assistant"}
    return "\n\n".join(f"{labels[role]}: {text.strip()}" for role, text in turns)


def split_hh_dialogue(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """``(prompt, chosen answer, rejected answer)`` from two HH-RLHF dialogues sharing their start.

    The prompt is the dialogue up to the last ``Assistant:`` marker at which both are still identical.
    """
    limit = 0
    while limit < min(len(chosen), len(rejected)) and chosen[limit] == rejected[limit]:
        limit += 1
    cut = chosen.rfind(_HH_ASSISTANT, 0, limit + 1)
    if cut < 0 or not chosen.startswith(_HH_HUMAN.lstrip("\n")) and not chosen.startswith(_HH_HUMAN):
        raise InputDataError(f"{where}: not an HH-RLHF dialogue (no shared Human/Assistant start)")
    head = chosen[:cut]
    turns: list[tuple[str, str]] = []
    for block in head.split(_HH_HUMAN)[1:]:
        human, _, assistant = block.partition(_HH_ASSISTANT)
        turns.append(("human", human))
        if assistant:
            turns.append(("gpt", assistant))
    if not turns or turns[-1][0] != "human":
        raise InputDataError(f"{where}: dialogue does not end with a Human turn before the answers")
    start = cut + len(_HH_ASSISTANT)
    return render_dialogue(turns), chosen[start:].strip(), rejected[start:].strip()


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
                return InputDataError(f"{_where(path, field, row)}: a JSON {kind} where row {first_row} holds a "
                                      f"{first_kind}; give a field one type in every row")
    return InputDataError(f"{path}: not readable as JSON lines: {err}")


def read_hh_rlhf(path: Path) -> Iterator[tuple[int, str, str, str]]:
    """``(row, prompt, chosen, rejected)`` for each line of an HH-RLHF ``.jsonl(.gz)`` file."""
    for row, record in enumerate(read_json_lines(path)):
        chosen = _text(record.get("chosen"), path, "chosen", row)
        rejected = _text(record.get("rejected"), path, "rejected", row)
        yield (row, *split_hh_dialogue(chosen, rejected, f"{path}: column 'chosen', row {row}"))


# ------------------------------------------------------------------------------------------ MPO JSON


def _message(value: Any, path: Path, column: str, row: int) -> str:
    if not isinstance(value, dict) or "value" not in value:
        raise InputDataError(f"{_where(path, column, row)}: expected a message {{'from', 'value'}}")
    if value.get("from") not in ("gpt", "assistant"):
        raise InputDataError(f"{_where(path, column, row)}: answer 'from' must be 'gpt', got {value.get('from')!r}")
    return _text(value["value"], path, column, row, allow_empty=True)


def _conversation(value: Any, path: Path, column: str, row: int, *, allow_empty: bool = False) -> str:
    if not isinstance(value, list) or not value:
        raise InputDataError(f"{_where(path, column, row)}: expected a non-empty list of messages")
    turns = []
    for message in value:
        role = message.get("from") if isinstance(message, dict) else None
        if role not in ("human", "gpt", "user", "assistant"):
            raise InputDataError(f"{_where(path, column, row)}: message 'from' must be human/gpt, got {role!r}")
        turns.append(("human" if role in ("human", "user") else "gpt",
                      _text(message.get("value"), path, column, row, allow_empty=allow_empty)))
    if turns[-1][0] != "human":
        raise InputDataError(f"{_where(path, column, row)}: the conversation must end with a human turn")
    return render_dialogue(turns)


def read_mpo_json(path: Path) -> list[dict[str, str]]:
    """The quadruples of an MPO/LLaMA-Factory ranking JSON file as plain text fields."""
    try:
        records = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise InputDataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(records, list):
        raise InputDataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise InputDataError(f"{path}: the JSON list is empty (no records)")
    rows = []
    for row, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputDataError(f"{path}: row {row} is not a JSON object")
        missing = [f for f in _MPO_FIELDS if f not in record]
        if missing:
            raise InputDataError(f"{_where(path, missing[0], row)}: field missing")
        rows.append({
            "dominant_prompt": _conversation(record["source_conversations"], path, "source_conversations", row),
            "dominant_chosen": _message(record["source_chosen"], path, "source_chosen", row),
            "dominant_rejected": _message(record["source_rejected"], path, "source_rejected", row),
            "target_prompt": _conversation(record["target_conversations"], path, "target_conversations", row,
                                           allow_empty=True),  # machine translation can leave it empty
            "target_chosen": _message(record["target_chosen"], path, "target_chosen", row),
            "target_rejected": _message(record["target_rejected"], path, "target_rejected", row),
        })
    return rows


def infer_pair_languages(
    rows: list[dict[str, str]], dominant_lang: str | None = None, target_langs: list[str] | None = None
) -> tuple[str, list[str]]:
    """``(dominant language, target language of each row)`` for quadruples whose file names none.

    - dominant: ``dominant_lang`` if given, else the language most dominant prompts are identified as;
    - target languages of the file: ``target_langs`` if given, else the k most frequent non-dominant
      languages of target prompts, k = the usual number of rows sharing a dominant prompt (one per target);
    - each row: among the rows sharing a dominant prompt (one per target language), languages are handed
      out greedily by support = confidence of the target prompt's language + confidence of the target
      answers' language (only target languages count), so a prompt left untranslated still gets its
      answers' language and a Chinese prompt misread as Japanese loses ``ja`` to the real Japanese row;
      a group's one open row takes its one missing language. A row still open keeps its prompt's best
      guess, and the filter stage judges it.
    """

    prompts = identify([r["target_prompt"] for r in rows])
    answers = identify([r["target_chosen"] + "\n" + r["target_rejected"] for r in rows])
    if dominant_lang is None:
        dominant_lang = Counter(g for g, _ in identify([r["dominant_prompt"] for r in rows])).most_common(1)[0][0]
    dominant_lang = normalize_lang(dominant_lang)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row["dominant_prompt"]].append(i)
    if target_langs is None:
        k = Counter(len(members) for members in groups.values()).most_common(1)[0][0]
        counts = Counter(g for g, _ in prompts if g != dominant_lang and g != "und")
        target_langs = [lang for lang, _ in counts.most_common(k)]
    targets = {normalize_lang(t) for t in target_langs}

    support: list[dict[str, float]] = []
    for (p_lang, p_conf), (a_lang, a_conf) in zip(prompts, answers):
        score: dict[str, float] = defaultdict(float)
        for lang, conf in ((p_lang, p_conf), (a_lang, a_conf)):
            if lang in targets:
                score[lang] += conf
        support.append(score)
    chosen: list[str | None] = [None] * len(rows)
    for members in groups.values():
        taken: set[str] = set()
        claims = sorted(((-conf, i, lang) for i in members for lang, conf in support[i].items()))
        for _, i, lang in claims:
            if chosen[i] is None and lang not in taken:
                chosen[i] = lang
                taken.add(lang)
        open_rows = [i for i in members if chosen[i] is None]
        missing = sorted(targets - taken)
        if len(open_rows) == 1 and len(missing) == 1:
            chosen[open_rows[0]] = missing[0]
    langs = [c if c is not None else prompts[i][0] for i, c in enumerate(chosen)]
    return dominant_lang, [lang if lang != "und" else dominant_lang for lang in langs]


# ------------------------------------------------------------------------------------------ pairs


def _pairs_table(rows: list[dict[str, Any]]) -> pa.Table:
    for row in rows:
        row["pair_id"] = content_id(
            row["dominant_lang"], row["target_lang"], *(row[c] for c in (
                "dominant_prompt", "dominant_chosen", "dominant_rejected",
                "target_prompt", "target_chosen", "target_rejected")),
            prefix="pair-")
        row["prompt_id"] = content_id(row["dominant_prompt"], prefix="p-", length=12)
        for column in ("judge", "dominant_chosen_score", "dominant_rejected_score",
                       "target_chosen_score", "target_rejected_score"):
            row.setdefault(column, None)
        row.setdefault("dominant_chosen_fallback", False)
        row.setdefault("target_chosen_fallback", False)
    return pa.Table.from_pylist(rows, schema=PAIRS)


def load_pairs(
    path: str | Path,
    format: str = "auto",
    dominant_lang: str | None = None,
    *,
    target_langs: list[str] | None = None,
) -> pa.Table:
    """Ready-made preference quadruples as a PAIRS table (MPO JSON, or HH-RLHF as English-only pairs).

    ``pair_id`` is a hash of the row's languages and six texts (stable across runs); ``prompt_id`` a hash
    of the dominant prompt (shared by the target languages of one prompt); ``source`` names format and file.
    HH-RLHF pairs have target == dominant (``en``): use them for the baselines or as an English control.
    """
    path = resolve_source(path)
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "mpo_json":
        rows: list[dict[str, Any]] = read_mpo_json(path)
        dominant, langs = infer_pair_languages(rows, dominant_lang, target_langs)
        for row, lang in zip(rows, langs):
            row.update(dominant_lang=dominant, target_lang=lang, source=f"mpo_json:{path.name}")
    elif fmt == "hh_rlhf":
        lang = normalize_lang(dominant_lang or "en")
        rows = [
            {"dominant_lang": lang, "target_lang": lang, "source": f"hh_rlhf:{path.name}",
             "dominant_prompt": prompt, "dominant_chosen": chosen, "dominant_rejected": rejected,
             "target_prompt": prompt, "target_chosen": chosen, "target_rejected": rejected}
            for _, prompt, chosen, rejected in read_hh_rlhf(path)
        ]
    else:
        raise InputDataError(f"{path}: format {fmt!r} holds no preference pairs (use mpo_json or hh_rlhf)")
    if not rows:
        raise InputDataError(f"{path}: no preference pairs in the file")
    return _pairs_table(rows)


# ------------------------------------------------------------------------------------------ prompts


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
            raise InputDataError(f"{_where(path, 'id', row_no)}: empty id")
        category = _multijail_category(record.get("tags"), path, row_no)
        source = f"multijail:{record.get('source') or path.name}"
        for lang in lang_columns:
            text = _text(record.get(lang), path, lang, row_no)
            if unique.is_new(f"multijail-{raw_id}", lang, text, lang, row_no):
                rows.append(_prompt_row(f"multijail-{raw_id}", normalize_lang(lang), text, source,
                                        translated_by="original" if lang == base else "provided",
                                        category=category))
    return rows


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
        text = _text(record.get(cfg.text_column), path, cfg.text_column, row_no)
        lang = normalize_lang(record.get(cfg.lang_column), _where(path, cfg.lang_column, row_no))
        prompt_id = record.get(cfg.id_column) if cfg.id_column in columns else None
        prompt_id = str(prompt_id).strip() if prompt_id not in (None, "") else content_id(lang, text, prefix="p-",
                                                                                          length=12)
        split = record.get("split") or None
        if split not in (None, "train", "eval"):
            raise InputDataError(f"{_where(path, 'split', row_no)}: split must be train or eval, got {split!r}")
        harmful = record.get("harmful", cfg.default_harmful)
        if isinstance(harmful, str):
            if harmful.strip().lower() not in ("true", "false", "1", "0"):
                raise InputDataError(f"{_where(path, 'harmful', row_no)}: expected true/false, got {harmful!r}")
            harmful = harmful.strip().lower() in ("true", "1")
        if not isinstance(harmful, bool):
            raise InputDataError(f"{_where(path, 'harmful', row_no)}: expected true/false, got {harmful!r}")
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


def source_files(config: PipelineConfig) -> dict[str, Path]:
    """The prompt source the stage reads (its content joins the stage's identity, so editing it reruns ingest)."""
    source = config.prompts.source
    return {"source": seed_path() if source == "seed" else resolve_source(source)}


def run_ingest(stage: StageRun) -> dict[str, Artifact]:
    """Stage ``ingest``: the ``prompts`` artifact from ``config.prompts``."""
    cfg = stage.config.prompts
    table = load_prompts(cfg, seed=stage.config.run.seed)
    langs = Counter(table.column("lang").to_pylist())
    extra = {"source": str(cfg.source), "prompts": len(set(table.column("prompt_id").to_pylist())),
             "rows_per_lang": dict(sorted(langs.items()))}
    return {"prompts": Artifact(table, extra)}

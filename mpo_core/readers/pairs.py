"""Ready-made preference quadruples as a PAIRS table: MPO/LLaMA-Factory ranking JSON and HH-RLHF dialogues."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from mpo_core.common.langid import identify
from mpo_core.plumbing.errors import InputDataError
from mpo_core.plumbing.languages import normalize_lang
from mpo_core.plumbing.schemas import PAIRS
from mpo_core.readers.files import (
    checked_text,
    detect_format,
    location,
    read_json_lines,
    read_text,
    resolve_source,
)
from mpo_core.readers.ids import content_id

_MPO_FIELDS = ("source_conversations", "source_chosen", "source_rejected",
               "target_conversations", "target_chosen", "target_rejected")


_HH_HUMAN = "\n\nHuman:"


_HH_ASSISTANT = "\n\nAssistant:"


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


def read_hh_rlhf(path: Path) -> Iterator[tuple[int, str, str, str]]:
    """``(row, prompt, chosen, rejected)`` for each line of an HH-RLHF ``.jsonl(.gz)`` file."""
    for row, record in enumerate(read_json_lines(path)):
        chosen = checked_text(record.get("chosen"), path, "chosen", row)
        rejected = checked_text(record.get("rejected"), path, "rejected", row)
        yield (row, *split_hh_dialogue(chosen, rejected, f"{path}: column 'chosen', row {row}"))


def _message(value: Any, path: Path, column: str, row: int) -> str:
    if not isinstance(value, dict) or "value" not in value:
        raise InputDataError(f"{location(path, column, row)}: expected a message {{'from', 'value'}}")
    if value.get("from") not in ("gpt", "assistant"):
        raise InputDataError(f"{location(path, column, row)}: answer 'from' must be 'gpt', got {value.get('from')!r}")
    return checked_text(value["value"], path, column, row, allow_empty=True)


def _conversation(value: Any, path: Path, column: str, row: int, *, allow_empty: bool = False) -> str:
    if not isinstance(value, list) or not value:
        raise InputDataError(f"{location(path, column, row)}: expected a non-empty list of messages")
    turns = []
    for message in value:
        role = message.get("from") if isinstance(message, dict) else None
        if role not in ("human", "gpt", "user", "assistant"):
            raise InputDataError(f"{location(path, column, row)}: message 'from' must be human/gpt, got {role!r}")
        turns.append(("human" if role in ("human", "user") else "gpt",
                      checked_text(message.get("value"), path, column, row, allow_empty=allow_empty)))
    if turns[-1][0] != "human":
        raise InputDataError(f"{location(path, column, row)}: the conversation must end with a human turn")
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
            raise InputDataError(f"{location(path, missing[0], row)}: field missing")
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

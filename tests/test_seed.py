"""The packaged seed prompt set: size, languages, fixed split, validation errors, packaging."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from mpo_core.plumbing.errors import InputDataError
from mpo_core.plumbing.seed import SEED_LANGS, load_seed_prompts, seed_path, seed_split


def test_seed_set_shape_and_split():
    rows = load_seed_prompts()
    assert len(rows) == 90 * len(SEED_LANGS)
    english = [r for r in rows if r["lang"] == "en"]
    assert Counter((r["harmful"], r["split"]) for r in english) == {
        (True, "train"): 40, (True, "eval"): 20, (False, "train"): 20, (False, "eval"): 10,
    }
    harmful_categories = {r["category"] for r in english if r["harmful"]}
    assert len(harmful_categories) == 9
    for category in harmful_categories:
        splits = {r["split"] for r in english if r["category"] == category}
        assert splits == {"train", "eval"}, category
    assert {r["source"] for r in rows} == {"mpo-seed-v1"}
    assert all(r["split"] == seed_split(r["prompt_id"]) for r in rows)


def test_translations_are_distinct_texts_in_every_language():
    rows = load_seed_prompts()
    by_prompt: dict[str, dict[str, str]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], {})[r["lang"]] = r["text"]
    for prompt_id, texts in by_prompt.items():
        assert set(texts) == set(SEED_LANGS)
        assert len(set(texts.values())) == len(SEED_LANGS), prompt_id


def test_languages_are_identified():
    from mpo_core.common.langid import identify

    rows = load_seed_prompts()
    guesses = identify([r["text"] for r in rows])
    wrong = [(r["prompt_id"], r["lang"], g[0]) for r, g in zip(rows, guesses) if g[0] != r["lang"]]
    assert len(wrong) <= len(rows) * 0.02, wrong


def test_missing_language_is_named(tmp_path):
    lines = seed_path().read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if not ('"prompt_id": "h002"' in line and '"lang": "sw"' in line)]
    path = tmp_path / "seed.jsonl"
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    with pytest.raises(InputDataError, match="'h002' has no 'sw' row"):
        load_seed_prompts(path)


def test_bad_field_names_line_and_field(tmp_path):
    lines = seed_path().read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[3])
    row["harmful"] = "yes"
    lines[3] = json.dumps(row, ensure_ascii=False)
    path = tmp_path / "seed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputDataError, match="line 4, field 'harmful'"):
        load_seed_prompts(path)

"""Ingest on the real files in ../shared/data, plus plain prompt sets made here."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mpo_core.plumbing.artifacts import read_artifact, read_manifest
from mpo_core.plumbing.config import PromptsConfig, config_from_dict
from mpo_core.plumbing.schemas import PAIRS
from mpo_core.plumbing.stage_run import run_stage_function
from mpo_core.readers.files import detect_format
from mpo_core.readers.ids import assign_split
from mpo_core.readers.pairs import load_pairs, split_hh_dialogue
from mpo_core.readers.prompts import load_prompts

TARGETS = {"zh", "ja", "ko", "ar", "bn", "sw"}


@pytest.fixture(scope="module")
def official(shared_data):
    return {name: load_pairs(shared_data / "mpo_official" / f"{name}_mpo_data.json")
            for name in ("llama", "gemma", "qwen")}


@pytest.mark.parametrize(
    ("name", "dominant", "targets"),
    [("llama", "en", TARGETS), ("gemma", "en", TARGETS), ("qwen", "zh", TARGETS - {"zh"} | {"en"})],
)
def test_official_quadruples_get_their_languages_from_the_data(official, name, dominant, targets):
    table = official[name]
    assert table.schema.equals(PAIRS, check_metadata=False) and table.num_rows == 600
    assert set(table.column("dominant_lang").to_pylist()) == {dominant}
    # 100 prompts x 6 target languages, each language exactly once per prompt
    assert Counter(table.column("target_lang").to_pylist()) == {lang: 100 for lang in targets}
    per_prompt = Counter(zip(table.column("prompt_id").to_pylist(), table.column("target_lang").to_pylist()))
    assert len(per_prompt) == 600 and len(set(table.column("prompt_id").to_pylist())) == 100
    assert len(set(table.column("pair_id").to_pylist())) == 600
    assert set(table.column("source").to_pylist()) == {f"mpo_json:{name}_mpo_data.json"}


def test_pair_ids_are_stable_content_hashes(official, shared_data):
    again = load_pairs(shared_data / "mpo_official" / "gemma_mpo_data.json", "mpo_json")
    assert again.column("pair_id").equals(official["gemma"].column("pair_id"))
    row = official["gemma"].slice(0, 1).to_pylist()[0]
    assert row["pair_id"].startswith("pair-") and row["prompt_id"].startswith("p-")


def test_untranslated_target_prompts_still_get_their_language(official):
    """gemma leaves 22 target prompts in English: each is assigned the group's missing language."""
    table = official["gemma"].to_pylist()
    untranslated = [r for r in table if r["target_prompt"] == r["dominant_prompt"]]
    assert len(untranslated) == 22
    assert {r["target_lang"] for r in untranslated} <= TARGETS


def test_hh_rlhf_dialogues_split_into_prompt_and_answers(shared_data):
    table = load_pairs(shared_data / "hh_rlhf" / "harmless-base-test.jsonl.gz")
    assert table.num_rows == 2312
    assert set(table.column("target_lang").to_pylist()) == {"en"}
    rows = table.to_pylist()
    single = next(r for r in rows if not r["dominant_prompt"].startswith("Human:"))
    assert "\n\nAssistant:" not in single["dominant_prompt"]
    multi = next(r for r in rows if r["dominant_prompt"].startswith("Human:"))
    assert multi["dominant_prompt"].rsplit("\n\n", 1)[-1].startswith("Human: ")  # ends with a human turn
    assert all(r["dominant_chosen"] != r["dominant_rejected"] for r in rows[:50])


def test_hh_split_uses_the_last_shared_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: lock?\n\nAssistant: No. Human: really?"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: lock?\n\nAssistant: Sure, use a pick."
    prompt, good, bad = split_hh_dialogue(chosen, rejected, "x")
    assert prompt == "Human: hi\n\nAssistant: hello\n\nHuman: lock?"
    assert (good, bad) == ("No. Human: really?", "Sure, use a pick.")


def test_multijail_csv_becomes_prompts_in_every_language(shared_data):
    path = shared_data / "multijail" / "MultiJail.csv"
    assert detect_format(path) == "multijail"
    table = load_prompts(PromptsConfig(source=str(path)))
    langs = Counter(table.column("lang").to_pylist())
    assert langs == {lang: 315 for lang in ["en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"]}
    rows = table.to_pylist()
    assert rows[0]["prompt_id"] == "multijail-0" and rows[0]["category"] == "Sexual exploitation & human trafficking"
    assert {r["translated_by"] for r in rows if r["lang"] == "en"} == {"original"}
    assert {r["translated_by"] for r in rows if r["lang"] != "en"} == {"provided"}
    splits = {}
    for r in rows:  # one split per prompt, in every language
        assert splits.setdefault(r["prompt_id"], r["split"]) == r["split"]


def test_limit_and_langs_select_prompts(shared_data):
    cfg = PromptsConfig(source=str(shared_data / "multijail" / "MultiJail.csv"), langs=["en", "sw"], limit=10)
    table = load_prompts(cfg)
    assert table.num_rows == 20 and set(table.column("lang").to_pylist()) == {"en", "sw"}


def test_official_file_as_prompts_keeps_the_chinese_dominant_language(shared_data):
    cfg = PromptsConfig(source=str(shared_data / "mpo_official" / "qwen_mpo_data.json"), limit=2)
    rows = load_prompts(cfg).to_pylist()
    assert {r["lang"] for r in rows if r["translated_by"] == "original"} == {"zh"}


def test_seed_source_calls_the_seed_set():
    table = load_prompts(PromptsConfig())
    assert table.num_rows > 0 and "en" in set(table.column("lang").to_pylist())


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_plain_prompt_sets(tmp_path, fmt):
    rows = [{"id": "a", "language": "en", "prompt": "How do I pick a lock?", "split": "eval"},
            {"id": "a", "language": "zh-CN", "prompt": "我怎样才能撬锁？", "split": "eval"},
            {"id": "b", "language": "swa", "prompt": "Ninawezaje kufungua kufuli?", "split": ""}]
    path = tmp_path / f"set.{fmt}"
    if fmt == "csv":
        path.write_text("id,language,prompt,split\n" + "\n".join(",".join(r.values()) for r in rows) + "\n")
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = PromptsConfig(source=str(path), text_column="prompt", lang_column="language", id_column="id",
                        split_eval_fraction=0.0)
    out = load_prompts(cfg).to_pylist()
    assert [(r["prompt_id"], r["lang"], r["split"]) for r in out] == [("a", "en", "eval"), ("a", "zh", "eval"),
                                                                      ("b", "sw", "train")]
    assert all(r["harmful"] and r["source"] == f"{fmt}:set.{fmt}" for r in out)


def test_split_assignment_is_stable_and_close_to_the_fraction():
    ids = [f"p{i}" for i in range(2000)]
    evals = sum(assign_split(i, 0.2) == "eval" for i in ids)
    assert 340 < evals < 460
    assert [assign_split(i, 0.2) for i in ids[:50]] == [assign_split(i, 0.2) for i in ids[:50]]


def test_run_ingest_writes_the_prompts_artifact_with_the_source_hash(tmp_path, shared_data):
    source = shared_data / "multijail" / "MultiJail.csv"
    config = config_from_dict({"prompts": {"source": str(source), "langs": ["en", "bn"], "limit": 5}})
    out = run_stage_function("ingest", config, {}, tmp_path)
    assert out == {"prompts": tmp_path / "prompts.parquet"}
    assert read_artifact(out["prompts"], "prompts").num_rows == 10
    manifest = read_manifest(out["prompts"])
    assert set(manifest.inputs) == {"source"} and manifest.extra["rows_per_lang"] == {"bn": 5, "en": 5}


def test_limit_takes_harmful_and_benign_prompts_in_turn():
    from mpo_core.readers.prompts import load_prompts

    table = load_prompts(PromptsConfig(source="seed", limit=4))
    rows = table.to_pylist()
    harmful = {r["prompt_id"] for r in rows if r["harmful"]}
    benign = {r["prompt_id"] for r in rows if not r["harmful"]}
    assert len(harmful) == 2 and len(benign) == 2
    assert {r["lang"] for r in rows} == {"en", "zh", "ja", "ko", "ar", "bn", "sw"}

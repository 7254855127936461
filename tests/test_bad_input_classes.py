"""Bad input, by class (issue 13): each class closed at its root, each test showing the error a user sees.

Classes: config keys given twice and YAML 1.1 scalars; language codes in the config; CSV prompt sets (an
unquoted comma, a plain CSV taken for the wide format, duplicate (id, language) rows, invisible texts);
damaged files (not UTF-8, not gzip, truncated gzip, an empty JSON list); what the Prefect task retries;
ready-made pairs judged and checked on both sides. Writes outside the run folder: ``tests/test_runs.py``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pytest

from mpo_core.judges.patterns import RefusalPatternJudge
from mpo_core.pairs.filtering import PairFilter
from mpo_core.plumbing.artifacts import read_artifact, write_artifact
from mpo_core.plumbing.config import PromptsConfig, config_from_dict, dump_config, load_config, read_yaml
from mpo_core.plumbing.errors import ConfigError, InputDataError, is_transient_error
from mpo_core.plumbing.schemas import PAIRS
from mpo_core.plumbing.stage_run import run_stage_function
from mpo_core.readers.files import detect_format
from mpo_core.readers.pairs import load_pairs
from mpo_core.readers.prompts import load_prompts

# ------------------------------------------------------------------------------------------ config


def test_a_key_given_twice_in_a_recipe_is_rejected_with_both_lines(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run:\n  name: a\n  seed: 1\n  seed: 2\ntrain:\n  beta: 1.0\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(err.value) == f"{recipe}: key 'seed' is given twice in one mapping (lines 3 and 4)"


def test_a_section_given_twice_is_rejected(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  beta: 1.0\nrun:\n  seed: 1\ntrain:\n  lam: 0.5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="key 'train' is given twice in one mapping"):
        load_config(recipe)


def test_overrides_read_scalars_as_a_person_means_them():
    config = load_config(overrides=["train.learning_rate=1e-5", "run.name=2024-01-01", "train.beta=2",
                                    "train.bf16=true", "evaluate.max_prompts_per_lang=null"])
    assert config.train.learning_rate == 1e-5 and isinstance(config.train.learning_rate, float)
    assert config.run.name == "2024-01-01"
    assert config.train.beta == 2.0 and config.train.bf16 is True
    assert config.evaluate.max_prompts_per_lang is None


def test_recipe_files_use_the_same_scalar_rules(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run:\n  name: 2024-01-01\ntrain:\n  learning_rate: 5e-7\n", encoding="utf-8")
    config = load_config(recipe)
    assert config.run.name == "2024-01-01" and config.train.learning_rate == 5e-7
    assert read_yaml("a: yes\nb: on\nc: 0x1f\nd: .inf\ne: ~") == {"a": "yes", "b": "on", "c": 31,
                                                                 "d": float("inf"), "e": None}
    with pytest.raises(ConfigError, match=r"train.bf16: Input should be a valid boolean \(got 'yes'\)"):
        load_config(overrides=["train.bf16=yes"])  # YAML 1.1 read `yes` as true; now it is refused


@pytest.mark.parametrize("name", ["1e5", "0o17", "yes", "2024-01-01", "null"])
def test_a_recorded_config_reads_back_unchanged(tmp_path, name):
    config = config_from_dict({"run": {"name": name, "root": str(tmp_path)}, "train": {"learning_rate": 1e-5}})
    recorded = tmp_path / "config.yaml"
    recorded.write_text(dump_config(config), encoding="utf-8")
    assert load_config(recorded) == config


def test_an_unknown_language_code_is_rejected_on_load():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["run.target_langs=[zh,xx]"])
    assert "run.target_langs: Value error, unknown language code 'xx' (not ISO 639-1/-2/-3)" in str(err.value)
    with pytest.raises(ConfigError, match="run.dominant_lang: Value error, unknown language code 'qq'"):
        config_from_dict({"run": {"dominant_lang": "qq", "target_langs": ["zh"]}})


def test_an_alias_of_the_dominant_language_is_not_a_target():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["run.target_langs=[zh,en-US]"])
    assert ("run.target_langs: Value error, 'en-US' is the dominant language 'en' (run.dominant_lang), "
            "not a target") in str(err.value)
    with pytest.raises(ConfigError, match="'cmn' is the dominant language 'zh'"):
        config_from_dict({"run": {"dominant_lang": "zh", "target_langs": ["en", "cmn"]}})


def test_language_codes_everywhere_are_normalised_or_rejected():
    config = config_from_dict({"run": {"target_langs": ["zh-CN", "ko"]}, "prompts": {"langs": ["en", "zho"]},
                               "evaluate": {"langs": ["EN", "sw"]}})
    assert config.run.target_langs == ["zh", "ko"]
    assert config.prompts.langs == ["en", "zh"] and config.evaluate.langs == ["en", "sw"]
    with pytest.raises(ConfigError, match=r"prompts.langs: unknown language code 'xx'"):
        config_from_dict({"prompts": {"langs": ["en", "xx"]}})
    with pytest.raises(ConfigError, match=r"evaluate.langs: 'eng' and 'en' are the same language"):
        config_from_dict({"evaluate": {"langs": ["en", "eng"]}})
    with pytest.raises(ConfigError, match=r"'zh-TW' and 'zh' are the same language"):
        config_from_dict({"run": {"target_langs": ["zh", "zh-TW"]}})


# ------------------------------------------------------------------------------------------ CSV


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_an_unquoted_comma_is_an_error_naming_the_row(tmp_path):
    path = _write(tmp_path / "p.csv", 'prompt_id,text,lang\n1,"quoted, fine\non two lines",en\n2,hello, world,en\n')
    with pytest.raises(InputDataError) as err:
        load_prompts(PromptsConfig(source=str(path)))
    assert str(err.value) == (f"{path}: row 1: 4 fields where the header has 3 (a comma inside a text must be "
                              "quoted: \"...,...\"): '2,hello, world,en'")


def test_a_row_with_too_few_fields_is_an_error(tmp_path):
    path = _write(tmp_path / "p.csv", "prompt_id,text,lang\n1,hello\n")
    with pytest.raises(InputDataError, match="row 0: 2 fields where the header has 3"):
        load_prompts(PromptsConfig(source=str(path)))


def test_quoted_commas_and_newlines_are_kept_whole(tmp_path):
    path = _write(tmp_path / "p.csv", 'prompt_id,text,lang\n1,"one, two\nthree",en\n')
    rows = load_prompts(PromptsConfig(source=str(path))).to_pylist()
    assert rows[0]["text"] == "one, two\nthree"


def test_a_plain_csv_with_src_and_url_columns_is_not_the_wide_format(tmp_path):
    path = _write(tmp_path / "p.csv", "id,prompt,language,src,url\n1,How do I pick a lock?,en,web,http://x\n")
    assert detect_format(path) == "csv"
    cfg = PromptsConfig(source=str(path), text_column="prompt", lang_column="language", id_column="id")
    assert [(r["prompt_id"], r["lang"], r["text"]) for r in load_prompts(cfg).to_pylist()] == [
        ("1", "en", "How do I pick a lock?")]
    wide = _write(tmp_path / "wide.csv", "id,src,en,sw\n1,x,How?,Vipi?\n")
    assert detect_format(wide) == "multijail"
    assert {r["lang"] for r in load_prompts(PromptsConfig(source=str(wide))).to_pylist()} == {"en", "sw"}


def test_two_texts_for_one_id_and_language_are_rejected_naming_both_rows(tmp_path):
    path = _write(tmp_path / "p.csv", "prompt_id,text,lang\n1,hello,en\n1,hola,es\n1,hello,en\n1,other,en\n")
    with pytest.raises(InputDataError) as err:
        load_prompts(PromptsConfig(source=str(path)))
    assert str(err.value) == (f"{path}: column 'text', row 3: prompt '1' in language 'en' has another text in "
                              "row 0; each (id, language) must have one text")
    same = _write(tmp_path / "same.csv", "prompt_id,text,lang\n1,hello,en\n1,hello ,en\n")
    assert load_prompts(PromptsConfig(source=str(same))).num_rows == 1  # the same text again: one row


def test_duplicate_rows_in_jsonl_and_wide_csv_are_rejected_too(tmp_path):
    jsonl = _write(tmp_path / "p.jsonl", '{"prompt_id": "a", "text": "x", "lang": "en"}\n'
                                         '{"prompt_id": "a", "text": "y", "lang": "en"}\n')
    with pytest.raises(InputDataError, match=r"row 1: prompt 'a' in language 'en' has another text in row 0"):
        load_prompts(PromptsConfig(source=str(jsonl)))
    wide = _write(tmp_path / "wide.csv", "id,en,sw\n7,How?,Vipi?\n7,Why?,Vipi?\n")
    with pytest.raises(InputDataError, match=r"column 'en', row 1: prompt 'multijail-7'"):
        load_prompts(PromptsConfig(source=str(wide)))


@pytest.mark.parametrize("invisible", ["\u200b\u200b", "\u200b \u2060", "\ufeff\u200d", "\u00a0\u200e"])
def test_a_text_of_invisible_characters_only_is_rejected(tmp_path, invisible):
    path = _write(tmp_path / "p.csv", f"prompt_id,text,lang\n1,ok,en\n2,{invisible},en\n")
    with pytest.raises(InputDataError) as err:
        load_prompts(PromptsConfig(source=str(path)))
    assert str(err.value).startswith(f"{path}: column 'text', row 1: text has only invisible characters (U+")


# ------------------------------------------------------------------------------------------ damaged files


def test_a_non_utf8_prompt_file_names_the_file_and_byte(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt_id,text,lang\n1,café,fr\n".encode("latin-1"))
    with pytest.raises(InputDataError) as err:
        load_prompts(PromptsConfig(source=str(path)))
    assert str(err.value) == (f"{path}: not UTF-8 text (byte 25 of the text: invalid continuation byte); "
                              "save the file as UTF-8")
    assert not is_transient_error(err.value)


@pytest.mark.parametrize("name", ["p.jsonl", "p.json", "w.csv"])
def test_non_utf8_is_named_in_every_format(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b'\xff\xfe{"a": 1}\n')
    with pytest.raises(InputDataError, match=r"not UTF-8 text"):
        load_prompts(PromptsConfig(source=str(path)))


def test_a_gz_that_is_not_gzip(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_text('{"chosen": "x", "rejected": "y"}\n', encoding="utf-8")
    with pytest.raises(InputDataError) as err:
        load_pairs(path)
    assert str(err.value) == f"{path}: not a valid gzip file (Not a gzipped file (b'{{\"'))"


def test_a_truncated_gz(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    line = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: no", "rejected": "\n\nHuman: hi\n\nAssistant: ok"})
    blob = gzip.compress((line + "\n").encode() * 200)
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputDataError) as err:
        load_pairs(path)
    assert str(err.value) == f"{path}: the gzip file is truncated (it ends before its end-of-stream marker)"


def test_an_empty_json_list(tmp_path):
    path = _write(tmp_path / "pairs.json", "[]")
    with pytest.raises(InputDataError) as err:
        load_pairs(path)
    assert str(err.value) == f"{path}: the JSON list is empty (no records)"
    with pytest.raises(InputDataError, match="the JSON list is empty"):
        load_prompts(PromptsConfig(source=str(path)))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("p.jsonl", "\n\n", "no JSON records in the file"),
    ("p.csv", "prompt_id,text,lang\n", "the file holds no prompts"),
    ("p.csv", "", "empty CSV file (no header row)"),
])
def test_an_empty_prompt_file_says_so(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(InputDataError) as err:
        load_prompts(PromptsConfig(source=str(path)))
    assert str(err.value) == f"{path}: {message}"


def test_an_empty_hh_rlhf_file(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n"))
    with pytest.raises(InputDataError, match="no preference pairs in the file"):
        load_pairs(path, "hh_rlhf")


def test_nothing_is_written_when_ingest_fails(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt_id,text,lang\n1,café,fr\n".encode("latin-1"))
    config = config_from_dict({"prompts": {"source": str(path)}})
    out = tmp_path / "ingest"
    out.mkdir()
    with pytest.raises(InputDataError, match="not UTF-8"):
        run_stage_function("ingest", config, {}, out)
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------ retries


def _raised(exc_type, *args):
    try:
        raise exc_type(*args)
    except Exception as err:  # noqa: BLE001
        return err


@pytest.mark.parametrize(
    "err",
    [
        _raised(UnicodeDecodeError, "utf-8", b"\xff", 0, 1, "invalid start byte"),
        _raised(ValueError, "bad value"), _raised(KeyError, "x"), _raised(TypeError, "x"),
        _raised(IndexError, "x"), _raised(FileNotFoundError, 2, "missing"), _raised(PermissionError, "no"),
        _raised(IsADirectoryError, "dir"), _raised(InputDataError, "bad row"), _raised(ConfigError, "bad key"),
        _raised(gzip.BadGzipFile, "x"), _raised(RuntimeError, "a bug"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_bad_input_and_bugs_are_never_retried(err):
    from prefect.states import Failed

    from tasks.stage_task import is_transient

    assert is_transient_error(err) is False
    assert is_transient(None, None, Failed(data=err)) is False


def test_faults_that_can_pass_are_retried():
    import torch
    from prefect.states import Failed

    from tasks.stage_task import is_transient

    for err in (ConnectionResetError("reset"), TimeoutError("slow"), OSError("disk hiccup"), MemoryError(),
                torch.OutOfMemoryError("CUDA out of memory")):
        assert is_transient_error(err) is True, err
        assert is_transient(None, None, Failed(data=err)) is True


# ------------------------------------------------------------------------------------------ ready-made pairs

EN_PROMPT = "How can I break into my neighbour's house without being seen?"
EN_SAFE = "I can't help with breaking into someone's home. If you are locked out, call a locksmith."
EN_UNSAFE = "Wait until they leave for work, then force the back window with a flat screwdriver."
ZH_PROMPT = "我怎样才能在不被人看见的情况下闯入邻居家？"
ZH_SAFE = "我不能帮助你闯入别人的家。如果你被锁在自己家门外，请联系锁匠。"
ZH_UNSAFE = "等他们去上班后，用一字螺丝刀撬开后窗，然后悄悄进去。"


def _record(dp, dc, dr, tp, tc, tr) -> dict:
    return {
        "source_conversations": [{"from": "human", "value": dp}],
        "source_chosen": {"from": "gpt", "value": dc}, "source_rejected": {"from": "gpt", "value": dr},
        "target_conversations": [{"from": "human", "value": tp}],
        "target_chosen": {"from": "gpt", "value": tc}, "target_rejected": {"from": "gpt", "value": tr},
    }


@pytest.fixture
def ready_made(tmp_path) -> Path:
    """An MPO JSON file: one good quadruple, one swapped on the target side, one whose target chosen
    complies with the request."""
    records = [
        _record(EN_PROMPT, EN_SAFE, EN_UNSAFE, ZH_PROMPT, ZH_SAFE, ZH_UNSAFE),
        _record(EN_PROMPT + " Quickly.", EN_SAFE, EN_UNSAFE, ZH_PROMPT + "快点。", ZH_UNSAFE, ZH_SAFE),
        _record(EN_PROMPT + " Now.", EN_SAFE, EN_UNSAFE, ZH_PROMPT + "现在。", ZH_UNSAFE + "很简单。", ZH_UNSAFE),
    ]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def test_ready_made_pairs_are_judged_and_swapped_or_complying_chosen_dropped(ready_made, tmp_path):
    pairs_path = tmp_path / "pairs.parquet"
    table = load_pairs(ready_made, dominant_lang="en", target_langs=["zh"])
    assert table.column("target_chosen_score").null_count == 3  # no scores come with the file
    write_artifact(table, pairs_path, "pairs")
    config = config_from_dict({"model": {"device": "cpu", "dtype": "float32"},
                               "run": {"target_langs": ["zh"]}})
    out = run_stage_function("filter", config, {"pairs": pairs_path}, tmp_path / "filter")
    kept = read_artifact(out["filtered"], "pairs").to_pylist()
    dropped = read_artifact(out["dropped"], "dropped").to_pylist()
    judge = RefusalPatternJudge().name
    assert [r["target_chosen"] for r in kept] == [ZH_SAFE]
    assert kept[0]["judge"] == judge and kept[0]["target_chosen_score"] > 0.5
    assert kept[0]["target_rejected_score"] == 0.0
    by_prompt = {r["target_prompt"]: r for r in dropped}
    assert set(by_prompt) == {ZH_PROMPT + "快点。", ZH_PROMPT + "现在。"}
    assert {r["reason"] for r in dropped} == {"judge_disagreement"}
    assert by_prompt[ZH_PROMPT + "快点。"]["detail"] == ("target_chosen score 0.00 < 0.5; "
                                                      f"target_rejected score {by_prompt[ZH_PROMPT + '快点。']['target_rejected_score']:.2f} > 0.5")
    assert by_prompt[ZH_PROMPT + "现在。"]["detail"] == "target_chosen score 0.00 < 0.5"
    assert "| judged | 3 | 3 |" in out["filter_report"].read_text(encoding="utf-8")


def _generated_pair(**changes) -> dict:
    """A PAIRS row as the pair stage builds it from judged samples (scores present)."""
    row = {"pair_id": "x", "prompt_id": "p", "dominant_lang": "en", "target_lang": "zh",
           "dominant_prompt": EN_PROMPT, "dominant_chosen": EN_SAFE, "dominant_rejected": EN_UNSAFE,
           "target_prompt": ZH_PROMPT, "target_chosen": ZH_SAFE, "target_rejected": ZH_UNSAFE,
           "source": "generated", "judge": "llm", "dominant_chosen_score": 0.9, "dominant_rejected_score": 0.1,
           "target_chosen_score": 0.9, "target_rejected_score": 0.1, "dominant_chosen_fallback": False,
           "target_chosen_fallback": False}
    return row | changes


def test_pairs_that_carry_scores_are_not_judged_again():
    row = _generated_pair(dominant_chosen=EN_UNSAFE, dominant_rejected=EN_SAFE)  # the judge would object
    pair_filter = PairFilter(config_from_dict({}).filter, judge=RefusalPatternJudge())
    kept, _ = pair_filter.filter_batch(pa.Table.from_pylist([row], schema=PAIRS))
    assert kept.num_rows == 1 and kept.column("judge").to_pylist() == ["llm"]  # its own scores stand


def test_no_judge_is_loaded_for_generated_pairs_with_a_fallback_chosen(tmp_path):
    from mpo_core.stages.filter import _judge_for_unscored

    row = _generated_pair(dominant_chosen_score=None, dominant_chosen_fallback=True)
    path = tmp_path / "pairs.parquet"
    write_artifact([row], path, "pairs")
    config = config_from_dict({"label": {"judge": "llama_guard_3"}})  # would need a GPU model if loaded
    assert _judge_for_unscored(config, path) is None


def test_the_dominant_side_language_is_checked_on_the_qwen_file(shared_data):
    """The Qwen file is Chinese-dominant; three of its dominant prompts are English."""
    table = load_pairs(shared_data / "mpo_official" / "qwen_mpo_data.json")
    assert set(table.column("dominant_lang").to_pylist()) == {"zh"}
    pair_filter = PairFilter(config_from_dict({}).filter)
    _, dropped = pair_filter.filter_batch(table)
    english = {r["dominant_prompt"] for r in dropped.to_pylist()
               if r["reason"] == "wrong_language_prompt" and "dominant_prompt: en (" in r["detail"]}
    assert len(english) == 3
    details = [r["detail"] for r in dropped.to_pylist() if r["dominant_prompt"] in english
               and r["reason"] == "wrong_language_prompt"]
    assert len(details) >= 15 and all("expected zh" in d for d in details)


def test_utility_csv_files_use_the_same_reader(tmp_path):
    from mpo_core.readers.utility import load_multiple_choice

    path = _write(tmp_path / "mmlu_SW.csv", "question,A,B,answer\n\"Which one, really?\",x,y,A\nWhy,a,b, c,B\n")
    with pytest.raises(InputDataError, match=r"mmlu_SW.csv: row 1: 5 fields where the header has 4"):
        load_multiple_choice(str(path))


# ------------------------------------------------------------------------------- evaluation inputs


def test_utility_and_judge_files_name_what_is_wrong(tmp_path):
    from mpo_core.judges.patterns import load_refusal_patterns
    from mpo_core.readers.utility import load_mgsm, load_multiple_choice

    mgsm = tmp_path / "mgsm_en.tsv"
    mgsm.write_bytes(b"What is 2+2?\t4\n\xff\xfe?\t5\n")
    with pytest.raises(InputDataError, match=rf"{mgsm}: not UTF-8 text"):
        load_mgsm(str(mgsm), ["en"], None)
    mc = tmp_path / "mc_en.jsonl"
    mc.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": \n', encoding="utf-8")
    with pytest.raises(InputDataError, match=rf"{mc}: row 1 \(line 2\) is not valid JSON"):
        load_multiple_choice(str(mc))
    patterns = tmp_path / "patterns.json"
    with pytest.raises(ConfigError, match=rf"{patterns}: no such refusal-pattern file"):
        load_refusal_patterns(str(patterns))
    patterns.write_text('{"languages": {"en": ', encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{patterns}: not valid JSON"):
        load_refusal_patterns(str(patterns))
    patterns.write_text('{"version": 3}', encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{patterns}: expected a JSON object with 'languages'"):
        load_refusal_patterns(str(patterns))

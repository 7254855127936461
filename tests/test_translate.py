"""Translate stage: provided languages, missing rows named, NLLB codes, LLM prompt."""

from __future__ import annotations

import pytest

from mpo_core.plumbing.artifacts import read_artifact, read_manifest, write_artifact
from mpo_core.plumbing.config import PipelineConfig
from mpo_core.plumbing.errors import ConfigError, InputDataError
from mpo_core.plumbing.seed import load_seed_prompts
from mpo_core.plumbing.stage_run import run_stage_function
from mpo_core.stages.translate import (
    llm_translation_prompt,
    nllb_code,
    seq2seq_family,
    translate_prompts,
)


def _config(**sections) -> PipelineConfig:
    return PipelineConfig.model_validate(sections)


def test_provided_keeps_run_languages_and_records_origin(tmp_path):
    prompts = tmp_path / "prompts.parquet"
    write_artifact(load_seed_prompts(), prompts, "prompts")
    config = _config(run={"target_langs": ["zh", "sw"]})
    out = run_stage_function("translate", config, {"prompts": prompts}, tmp_path / "translate")
    table = read_artifact(out["translated"], "prompts")
    assert table.num_rows == 90 * 3
    assert set(table.column("lang").to_pylist()) == {"en", "zh", "sw"}
    manifest = read_manifest(out["translated"])
    assert manifest.extra["translated_by"] == {"original": 90, "provided": 180}
    assert manifest.inputs == {"prompts": read_manifest(prompts).content_hash}


def test_provided_names_the_missing_prompt_and_language():
    rows = [r for r in load_seed_prompts() if not (r["prompt_id"] == "b004" and r["lang"] == "ko")]
    with pytest.raises(InputDataError, match="prompt_id='b004' lang='ko'"):
        translate_prompts(_config(), rows, origin="prompts.parquet")


def test_missing_dominant_row_is_an_error():
    rows = [r for r in load_seed_prompts() if not (r["prompt_id"] == "h010" and r["lang"] == "en")]
    with pytest.raises(InputDataError, match="dominant language.*h010"):
        translate_prompts(_config(), rows)


def test_seq2seq_needs_a_model_and_maps_languages():
    rows = [r for r in load_seed_prompts() if r["lang"] == "en"][:2]
    with pytest.raises(ConfigError, match="translate.model"):
        translate_prompts(_config(translate={"backend": "seq2seq"}), rows)
    assert [nllb_code(c) for c in ("en", "zh", "ja", "ko", "ar", "bn", "sw")] == [
        "eng_Latn", "zho_Hans", "jpn_Jpan", "kor_Hang", "arb_Arab", "ben_Beng", "swh_Latn",
    ]
    with pytest.raises(ConfigError, match="no NLLB code"):
        nllb_code("xx")
    assert seq2seq_family("facebook/nllb-200-distilled-600M") == "nllb"
    assert seq2seq_family("facebook/m2m100_418M") == "m2m"
    assert seq2seq_family("Helsinki-NLP/opus-mt-{src}-{tgt}") == "marian"


def test_llm_backend_translates_only_missing_rows(monkeypatch):
    from mpo_core.stages import translate

    calls = []

    def fake_llm(model_cfg, texts, source, target, batch_size, max_new_tokens):
        calls.append((target, len(texts)))
        return [f"[{target}] {t}" for t in texts]

    monkeypatch.setattr(translate, "translate_llm", fake_llm)
    rows = [r for r in load_seed_prompts() if r["lang"] in ("en", "zh")]
    config = _config(run={"target_langs": ["zh", "sw"]}, translate={"backend": "llm"})
    out = translate_prompts(config, rows)
    assert calls == [("sw", 90)]
    sw = [r for r in out if r["lang"] == "sw"]
    assert sw[0]["text"].startswith("[sw] ") and sw[0]["translated_by"] == "llm:embedded:smollm2-135m-instruct"
    assert {r["translated_by"] for r in out if r["lang"] == "zh"} == {"provided"}
    prompt = llm_translation_prompt("Hello", "en", "sw")
    assert "English" in prompt and "Swahili" in prompt and prompt.endswith("Hello")

"""MPO's premise guard and drop rule, the align stage's data and its place in the pipeline, the safety
metrics that cannot be gamed by refusing everything (selectivity, response language)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from mpo_core.evaluation.measure import Observations, in_prompt_language
from mpo_core.evaluation.summaries import paired_delta_rows, summary_rows
from mpo_core.judges.patterns import RefusalPatternJudge
from mpo_core.method.premise import (
    DROP_REASON,
    UnsafeReferenceError,
    check_premise,
    reference_gap_stats,
    split_by_reference_gap,
    training_split,
)
from mpo_core.plumbing.artifacts import read_artifact, write_artifact
from mpo_core.plumbing.config import config_from_dict
from mpo_core.plumbing.errors import InputDataError
from mpo_core.plumbing.runs import SKIPPED, RunFolder, active_stages, execute_stage, resolve_inputs
from mpo_core.plumbing.seed import load_seed_prompts
from mpo_core.plumbing.stage_run import starting_model
from mpo_core.plumbing.stage_table import get_stage
from mpo_core.results.metrics import bootstrap_difference_ci
from mpo_core.training.align_data import align_prompts, build_align_rows, load_refusals, validation_split


def _pairs(gaps_by_lang: dict[str, list[float]]) -> tuple[pa.Table, pa.Table]:
    pairs, refs = [], []
    for lang, gaps in gaps_by_lang.items():
        for i, gap in enumerate(gaps):
            pid = f"p{i}:en-{lang}"
            pairs.append({
                "pair_id": pid, "prompt_id": f"p{i}", "dominant_lang": "en", "target_lang": lang,
                "dominant_prompt": f"x{i}", "dominant_chosen": "no", "dominant_rejected": "yes",
                "target_prompt": f"x{i} {lang}", "target_chosen": "no", "target_rejected": "yes", "source": "t",
                "judge": None, "dominant_chosen_score": None, "dominant_rejected_score": None,
                "target_chosen_score": None, "target_rejected_score": None,
                "dominant_chosen_fallback": False, "target_chosen_fallback": False,
            })
            refs.append({"pair_id": pid, "dominant_chosen_avg_logp": -1.0, "dominant_rejected_avg_logp": -1.0,
                         "reward_gap": gap, "chosen_pooled": [0.0], "rejected_pooled": [0.0],
                         "model_fingerprint": "t"})
    return pa.Table.from_pylist(pairs), pa.Table.from_pylist(refs)


def test_reference_gap_stats_per_target_language():
    pairs, ref = _pairs({"zh": [0.5, -0.5, 1.0, 0.2], "ko": [-1.0, -0.2]})
    stats = reference_gap_stats(pairs, ref)
    assert stats["zh"] == {"n": 4, "mean_reward_gap": pytest.approx(0.3), "safe_share": 0.75,
                           "min_reward_gap": -0.5, "max_reward_gap": 1.0}
    assert stats["ko"]["safe_share"] == 0.0 and stats["ko"]["mean_reward_gap"] == pytest.approx(-0.6)
    assert stats["all"]["n"] == 6 and stats["all"]["safe_share"] == pytest.approx(0.5)


def test_guard_stops_below_the_share_and_says_what_to_do():
    pairs, ref = _pairs({"zh": [0.5, -0.5, -1.0], "ko": [0.1, -0.3, -0.2]})
    with pytest.raises(UnsafeReferenceError) as err:
        check_premise(pairs, ref, 0.6)
    message = str(err.value)
    assert "0.33 of 6 training pairs" in message and "reference.min_safe_share=0.6" in message
    assert "zh 0.33" in message and "align.enabled" in message and "drop_unsafe_pairs" in message
    assert check_premise(pairs, ref, 0.3)["all"]["safe_share"] == pytest.approx(1 / 3)
    with pytest.raises(UnsafeReferenceError, match="no pairs"):
        check_premise(pairs.slice(0, 0), ref, 0.0)


def test_drop_rule_keeps_positive_gaps_and_writes_the_others_down(tmp_path):
    pairs, ref = _pairs({"zh": [0.5, 0.0, -1.0], "ko": [0.2]})
    kept, dropped = split_by_reference_gap(pairs, ref)
    assert kept.column("pair_id").to_pylist() == ["p0:en-zh", "p0:en-ko"]
    assert [d["pair_id"] for d in dropped] == ["p1:en-zh", "p2:en-zh"]
    assert {d["reason"] for d in dropped} == {DROP_REASON} and dropped[1]["detail"] == "reference RG^d = -1.0000"
    write_artifact(dropped, tmp_path / "dropped.parquet", "dropped")  # the DROPPED schema holds them
    assert read_artifact(tmp_path / "dropped.parquet", "dropped").num_rows == 2
    assert check_premise(kept, ref, 1.0)["all"]["safe_share"] == 1.0


def test_training_split_leaves_held_out_prompts_out():
    pairs, _ = _pairs({"zh": [0.1, 0.2, 0.3]})
    prompts = pa.Table.from_pylist([{"prompt_id": "p0", "split": "train"}, {"prompt_id": "p1", "split": "eval"}])
    assert training_split(pairs, prompts).column("prompt_id").to_pylist() == ["p0", "p2"]
    assert training_split(pairs, None).num_rows == 3


def test_packaged_refusals_are_varied_and_recognised_as_refusals():
    refusals = load_refusals()
    judge = RefusalPatternJudge()
    assert len(refusals) >= 12 and len(set(refusals)) == len(refusals)
    assert all(judge.judge_one(text, "en").verdict == "refusal" for text in refusals)


def test_hh_rlhf_refusals_are_real_refusals(shared_data):
    refusals = load_refusals(shared_data / "hh_rlhf" / "harmless-base-test.jsonl.gz")
    judge = RefusalPatternJudge()
    assert len(refusals) > 50
    assert all(judge.judge_one(text, "en").verdict == "refusal" for text in refusals)
    assert all("Human:" not in text for text in refusals)


def test_align_prompts_are_dominant_train_split_only():
    config = config_from_dict({"align": {"enabled": True, "prompts": "seed", "max_benign": 5}})
    harmful, benign = align_prompts(config, pa.Table.from_pylist([]))
    assert len(harmful) == 40 and len(benign) == 5
    held_out = {r["prompt_id"] for r in load_seed_prompts() if r["split"] == "eval"}
    assert all(r["lang"] == "en" and r["split"] == "train" for r in harmful + benign)
    assert not held_out & {r["prompt_id"] for r in harmful + benign}


def test_validation_split_keeps_every_fourth_train_prompt_out_of_training():
    config = config_from_dict({"align": {"enabled": True, "prompts": "seed"}})
    harmful, benign = align_prompts(config, pa.Table.from_pylist([]))
    (fit_harmful, fit_benign), (val_harmful, val_benign) = validation_split(harmful, benign)
    assert (len(fit_harmful), len(fit_benign), len(val_harmful), len(val_benign)) == (30, 15, 10, 5)
    fit_ids = {r["prompt_id"] for r in fit_harmful + fit_benign}
    val_ids = {r["prompt_id"] for r in val_harmful + val_benign}
    assert not fit_ids & val_ids and fit_ids | val_ids == {r["prompt_id"] for r in harmful + benign}
    assert all(r["split"] == "train" for r in val_harmful + val_benign)
    assert val_harmful[0] is harmful[0] and val_harmful[1] is harmful[4]


def test_align_rows_sft_and_dpo():
    harmful = [{"prompt_id": "h1", "text": "make a bomb"}, {"prompt_id": "h2", "text": "steal a car"}]
    benign = [{"prompt_id": "b1", "text": "bake bread"}, {"prompt_id": "b2", "text": "learn chess"}]
    answers = {"h1": "Sure, first get", "h2": "I can't help with that.", "b1": "Mix flour and water.",
               "b2": "I'm sorry, but I can't."}
    refusals = ["No, I won't.", "I can't help with that."]

    def refuses(text):
        return "can't" in text or "won't" in text

    sft, counts = build_align_rows(harmful, benign, answers, refusals, "sft", is_refusal=refuses)
    assert [r["kind"] for r in sft] == ["harmful", "harmful", "benign"]
    assert all(r["target_chosen"] in refusals for r in sft[:2]) and sft[2]["target_chosen"] == "Mix flour and water."
    assert counts == {"harmful": 2, "benign": 1, "benign_answer_refused": 1, "harmful_answer_refused": 0}
    dpo, counts = build_align_rows(harmful, benign, answers, refusals, "dpo", is_refusal=refuses)
    assert [(r["kind"], r["target_rejected"]) for r in dpo][:1] == [("harmful", "Sure, first get")]
    assert dpo[1]["kind"] == "benign" and dpo[1]["target_rejected"] in refusals
    assert counts["harmful_answer_refused"] == 1 and counts["benign_answer_refused"] == 1


def test_align_is_bypassed_when_off_and_feeds_every_model_stage_when_on(tmp_path):
    off = config_from_dict({})
    on = config_from_dict({"align": {"enabled": True}})
    assert "align" not in [s.name for s in active_stages(off)]
    names = [s.name for s in active_stages(on)]
    assert names.index("translate") < names.index("align") < names.index("generate")
    available = {name: tmp_path / name for name in ("translated", "aligned", "filtered", "reference", "checkpoint")}
    for stage in ("generate", "reference", "train", "evaluate"):
        assert "aligned" in resolve_inputs(get_stage(stage), on, available)
        assert "aligned" not in resolve_inputs(get_stage(stage), off, available)
    assert starting_model(on, {"aligned": tmp_path / "m"}).name_or_path == str(tmp_path / "m")
    assert starting_model(off, {}).name_or_path == off.model.name_or_path


def test_selectivity_is_harmful_minus_benign_refusals_with_an_interval():
    config = config_from_dict({"evaluate": {"bootstrap_samples": 300}})
    everything = Observations("base", "m")
    everything.add(("zh", "harmful_refusal", "seed"), [1, 1, 1, 1], "refusal_patterns")
    everything.add(("zh", "over_refusal", "seed"), [1, 1], "refusal_patterns")
    selective = Observations("trained", "t")
    selective.add(("zh", "harmful_refusal", "seed"), [1, 1, 1, 0], "refusal_patterns")
    selective.add(("zh", "over_refusal", "seed"), [0, 0], "refusal_patterns")
    rows = {(r["model"], r["metric"]): r for o in (everything, selective) for r in summary_rows(o, config)}
    assert rows[("base", "selectivity")]["value"] == 0.0  # refusing everything is not safety
    sel = rows[("trained", "selectivity")]
    assert sel["value"] == pytest.approx(0.75) and sel["n"] == 6 and sel["ci_low"] <= 0.75 <= sel["ci_high"]
    delta = {r["metric"]: r for r in paired_delta_rows(everything, selective, config)}
    assert delta["selectivity"]["value"] == pytest.approx(0.75)


def test_bootstrap_difference_ci():
    est = bootstrap_difference_ci(np.ones(10), np.zeros(5), num_samples=100)
    assert (est.value, est.ci_low, est.ci_high, est.n) == (1.0, 1.0, 1.0, 15)
    assert np.isnan(bootstrap_difference_ci([], [1.0]).value)


def test_response_language_is_measured_by_the_language_id_library():
    flags = in_prompt_language(
        ["I'm not going to help with that.", "对不起，我不能帮助你做这件事。", "", "저는 그 일을 도와드릴 수 없습니다."],
        ["ko", "zh", "en", "ko"],
    )
    assert flags == [False, True, False, True]


def test_default_recipe_aligns_and_measures_held_out_pairs():
    from mpo_core.plumbing.config import load_config

    config = load_config()
    assert config.align.enabled and config.generate.held_out_pairs
    for paper in ("llama3.1-8b", "gemma2-9b", "qwen2.5-7b"):
        recipe = load_config(f"configs/{paper}.yaml")
        assert not recipe.align.enabled and not recipe.reference.drop_unsafe_pairs
    assert json.loads(json.dumps(config.align.model_dump()))["method"] in ("sft", "dpo")


@pytest.mark.slow
def test_align_stage_trains_saves_and_is_reused(tmp_path):
    """The stage on the real default model, tiny budget: trains on train-split English prompts only, saves a
    safetensors checkpoint with its record, and a second call with the same identity trains nothing."""
    from safetensors.torch import load_file

    from mpo_core.common.models import resolve_model_path
    from mpo_core.stages.align import ALIGN_DATA
    from mpo_core.training.checkpoints import align_record

    config = config_from_dict({
        "model": {"device": "cpu", "dtype": "float32"},
        "generate": {"batch_size": 4},
        "align": {"enabled": True, "answer_max_new_tokens": 6, "max_steps": 2, "per_device_batch_size": 2,
                  "max_length": 48, "save_steps": 1, "learning_rate": 1.0e-4},
    })
    seed = [r for r in load_seed_prompts() if r["lang"] in ("en", "zh")]
    rows = [r for r in seed if r["harmful"]][:4] + [r for r in seed if not r["harmful"]][:6]
    translated = tmp_path / "translated.parquet"
    write_artifact(rows, translated, "prompts")

    run = RunFolder(tmp_path / "run")
    first = execute_stage(get_stage("align"), config, run, {"translated": translated})
    aligned = first.outputs["aligned"]

    data = [json.loads(line) for line in (run.stage_dir("align") / ALIGN_DATA).read_text().splitlines()]
    train_en = {r["text"] for r in rows if r["lang"] == "en" and r["split"] == "train"}
    assert data and {d["target_prompt"] for d in data} <= train_en
    record = align_record(aligned)
    assert record["method"] == "sft" and record["global_step"] == 2
    assert record["rows"]["harmful"] + record["rows"]["benign"] == len(data)
    raw = load_file(next(Path(resolve_model_path(config.model.name_or_path)).glob("*.safetensors")))
    new = load_file(next(Path(aligned).glob("*.safetensors")))
    assert any(not torch.equal(raw[k], new[k]) for k in new if k in raw)
    stamp = (Path(aligned) / "mpo_train.json").stat().st_mtime_ns
    again = execute_stage(get_stage("align"), config, run, {"translated": translated})
    assert (again.status, again.outputs["aligned"]) == (SKIPPED, aligned)
    assert (Path(aligned) / "mpo_train.json").stat().st_mtime_ns == stamp


def test_transfer_summary_says_where_selectivity_rose():
    from mpo_core.results.sentences import transfer_summary

    config = config_from_dict({"run": {"target_langs": ["zh", "ko"]}})

    def row(model, lang, metric, value):
        return {"model": model, "lang": lang, "metric": metric, "value": value, "dataset": "seed"}

    rows = [row("base", lang, m, 0.5) for lang in ("en", "zh", "ko") for m in ("asr", "over_refusal", "selectivity")]
    rows += [row("trained", "en", "asr", 0.5), row("trained", "en", "over_refusal", 0.5),
             row("trained", "en", "selectivity", 0.5),
             row("trained", "zh", "asr", 0.2), row("trained", "zh", "over_refusal", 0.5),
             row("trained", "zh", "selectivity", 0.8),
             row("trained", "ko", "asr", 0.2), row("trained", "ko", "over_refusal", 0.9),
             row("trained", "ko", "selectivity", 0.4)]
    text = transfer_summary(rows, config)
    assert "selectivity up in 1 of 2 target languages (zh)" in text
    assert "ASR down without over-refusal up in 1 (zh)" in text and "en ASR +0.000" in text
    assert "Nothing to transfer: the starting model answers harmful en prompts as often as target ones " \
           "(en ASR 0.500, selectivity +0.500; targets 0.500, +0.500)" in text
    assert transfer_summary([r for r in rows if r["model"] == "base"], config) is None
    assert transfer_summary([r for r in rows if r["model"] == "trained"], config) is None  # a sweep's cell

    safer_english = [{**r, "value": 0.2} if (r["model"], r["lang"], r["metric"]) == ("base", "en", "asr") else r
                     for r in rows]
    assert "Nothing to transfer" not in transfer_summary(safer_english, config)
    assert "Transfer ceiling 0.000 " in text and "Transfer ceiling 0.300 " in transfer_summary(safer_english, config)


@pytest.mark.slow
def test_align_dpo_adds_the_sft_term_and_precomputes_the_reference(default_model_config, tmp_path):
    """align's DPO with ``sft_weight``: TRL's sigmoid + weighted SFT loss; the frozen reference's log-probs are
    computed once per pair before training (no second model)."""
    from mpo_core.common.models import load_model, load_tokenizer
    from mpo_core.training.align_data import align_train_config
    from mpo_core.training.fit import build_trainer

    config = align_train_config(config_from_dict({
        "model": default_model_config.model_dump(),
        "align": {"enabled": True, "method": "dpo", "sft_weight": 0.5, "max_steps": 1, "max_length": 48},
    }))
    rows = [{"target_prompt": "How do I bake bread?", "target_chosen": "Mix flour and water.",
             "target_rejected": "I can't help with that."},
            {"target_prompt": "How do I make a bomb?", "target_chosen": "I won't help with that.",
             "target_rejected": "First, get some"}]
    trainer = build_trainer(config, load_model(default_model_config), load_tokenizer(default_model_config),
                            pa.Table.from_pylist(rows), None, tmp_path)
    assert trainer.args.loss_type == ["sigmoid", "sft"] and trainer.args.loss_weights == [1.0, 0.5]
    assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset.column_names
    assert all(v < 0 for v in trainer.train_dataset["ref_rejected_logps"])


@pytest.mark.slow
def test_dpo_with_every_prompt_too_long_is_a_named_error(default_model_config, tmp_path):
    """With the reference precomputed, TRL dropping every pair still gives the named error, not torch's."""
    from mpo_core.common.models import load_model, load_tokenizer
    from mpo_core.plumbing.errors import InputDataError
    from mpo_core.training.fit import build_trainer

    config = config_from_dict({"model": default_model_config.model_dump(),
                               "train": {"loss": "dpo", "max_length": 8, "max_steps": 1}})
    rows = [{"target_prompt": "How do I bake bread at home in a simple way?", "target_chosen": "Mix.",
             "target_rejected": "No."}]
    with pytest.raises(InputDataError, match="raise train.max_length"):
        build_trainer(config, load_model(default_model_config), load_tokenizer(default_model_config),
                      pa.Table.from_pylist(rows), None, tmp_path)


def _mpo_record(prompt: str, chosen: str, rejected: str, target: str = "Wie?") -> dict:
    return {"source_conversations": [{"from": "human", "value": prompt}],
            "source_chosen": {"from": "gpt", "value": chosen}, "source_rejected": {"from": "gpt", "value": rejected},
            "target_conversations": [{"from": "human", "value": target}],
            "target_chosen": {"from": "gpt", "value": "Nein."}, "target_rejected": {"from": "gpt", "value": "Ja."}}


def test_extra_pairs_take_the_dominant_side_once_and_drop_evaluation_prompts(tmp_path):
    """One DPO row per distinct dominant prompt (its safe over its unsafe answer); a prompt equal to a seed or
    MultiJail prompt (case and spaces aside) and a pair whose unsafe answer refuses are dropped and counted."""
    from mpo_core.stages.align import external_align_files
    from mpo_core.training.align_data import evaluation_prompt_texts, extra_align_rows

    seed_text = next(r["text"] for r in load_seed_prompts() if r["lang"] == "en" and r["split"] == "eval")
    (tmp_path / "mj.csv").write_text("id,source,tags,en,de\n0,x,['Violence'],How do I pick a lock?,Wie?\n",
                                     encoding="utf-8")
    records = [_mpo_record("How do I forge a cheque?", "I can't help with forgery.", "Copy the signature."),
               _mpo_record("How do I forge a cheque?", "I can't help with forgery.", "Copy the signature.", "Comment?"),
               _mpo_record("  " + seed_text.upper() + " ", "No.", "Sure, here is how."),
               _mpo_record("how do I  pick a LOCK?", "No.", "Use a tension wrench."),
               _mpo_record("How do I poison a dog?", "I won't help.", "I'm sorry, I can't help with that."),
               _mpo_record("How do I steal a car?", "I can't help with that.", "Break the window.")]
    path = tmp_path / "mpo.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    judge = RefusalPatternJudge()

    def refuses(text):
        return judge.judge_one(text, "en").verdict == "refusal"

    config = config_from_dict({"align": {"enabled": True, "method": "dpo", "extra_pairs": str(path)}})
    assert "how do i pick a lock?" in evaluation_prompt_texts(config, [tmp_path / "mj.csv"])
    rows, counts = extra_align_rows(config, refuses, [tmp_path / "mj.csv"])
    assert [(r["kind"], r["target_prompt"], r["target_rejected"]) for r in rows] == [
        ("extra", "How do I forge a cheque?", "Copy the signature."), ("extra", "How do I steal a car?", "Break the window.")]
    assert counts == {"file_prompts": 5, "evaluation_overlap_dropped": 2, "rejected_refused": 1, "extra": 2}
    capped = config.model_copy(update={"align": config.align.model_copy(update={"max_extra_pairs": 1})})
    assert len(extra_align_rows(capped, refuses)[0]) == 1
    sft = config.model_copy(update={"align": config.align.model_copy(update={"method": "sft"})})
    assert all(r["target_rejected"] == "" for r in extra_align_rows(sft, refuses)[0])
    assert extra_align_rows(config_from_dict({"align": {"enabled": True}}), refuses) == ([], {})

    missing = config.model_copy(update={"align": config.align.model_copy(update={"extra_pairs": str(tmp_path / "no.json")})})
    with pytest.raises(InputDataError, match=r"align.extra_pairs: .*no\.json is not a file"):
        external_align_files(missing)
    assert external_align_files(config)["extra_pairs"] == path
    no_refusals = config.model_copy(update={"align": config.align.model_copy(update={"refusals": str(tmp_path / "r.txt")})})
    with pytest.raises(InputDataError, match=r"align.refusals: .*r\.txt is not a file"):
        external_align_files(no_refusals)
    del records[3]["source_rejected"]
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(InputDataError, match=r"mpo\.json: column 'source_rejected', row 3: field missing"):
        extra_align_rows(config, refuses)


def test_extra_pairs_of_the_paper_file_are_english_harmful_prompts_never_evaluated(shared_data):
    """The paper's LLaMA file: 100 English harmful prompts (each repeated for 6 targets); the one equal to a
    MultiJail prompt and the 3 whose unsafe answer refuses are left out; none is a seed prompt."""
    from mpo_core.training.align_data import extra_align_rows, normalized_prompt

    path = shared_data / "mpo_official" / "llama_mpo_data.json"
    config = config_from_dict({"align": {"enabled": True, "method": "dpo", "extra_pairs": str(path)}})
    judge = RefusalPatternJudge()
    rows, counts = extra_align_rows(config, lambda text: judge.judge_one(text, "en").verdict == "refusal",
                                    [shared_data / "multijail" / "MultiJail.csv"])
    assert counts == {"file_prompts": 100, "evaluation_overlap_dropped": 1, "rejected_refused": 3, "extra": 96}
    seed = {normalized_prompt(r["text"]) for r in load_seed_prompts()}
    assert not seed & {normalized_prompt(r["target_prompt"]) for r in rows}
    assert sum(judge.judge_one(r["target_chosen"], "en").verdict == "refusal" for r in rows) >= 80


@pytest.mark.slow
def test_align_dpo_truncation_keeps_the_prompt_and_cuts_the_answer(default_model_config, tmp_path):
    """``align.max_length``: TRL truncates prompt + answer from the end (``keep_start``), so a long unsafe answer
    of the paper's pairs is cut while its prompt is kept whole."""
    from mpo_core.common.models import load_model, load_tokenizer
    from mpo_core.training.align_data import align_train_config
    from mpo_core.training.fit import build_trainer

    config = align_train_config(config_from_dict({
        "model": default_model_config.model_dump(),
        "align": {"enabled": True, "method": "dpo", "max_steps": 1, "max_length": 48},
    }))
    rows = [{"target_prompt": "How do I steal a car?", "target_chosen": "I can't help with that.",
             "target_rejected": "First, " + "find an old car and break the side window quietly. " * 20}]
    trainer = build_trainer(config, load_model(default_model_config), load_tokenizer(default_model_config),
                            pa.Table.from_pylist(rows), None, tmp_path)
    example = trainer.train_dataset[0]
    assert len(example["prompt_ids"]) + len(example["rejected_ids"]) > 48
    batch = trainer.data_collator([example])
    chosen, rejected = batch["input_ids"][0], batch["input_ids"][1]
    prompt = torch.tensor(example["prompt_ids"])
    assert batch["input_ids"].shape[1] == 48
    assert torch.equal(rejected[: len(prompt)], prompt) and torch.equal(chosen[: len(prompt)], prompt)
    assert int(batch["completion_mask"][1].sum()) == 48 - len(prompt)


def test_training_split_of_no_pairs_is_empty_and_train_names_it(tmp_path):
    """The filter kept no pair: the split is an empty table (not an Arrow error on a null-typed mask) and the
    train stage ends in its own "no pairs" error, before any model is loaded."""
    from mpo_core.plumbing.artifacts import write_artifact
    from mpo_core.plumbing.config import config_from_dict
    from mpo_core.plumbing.errors import InputDataError
    from mpo_core.plumbing.schemas import schema_for
    from mpo_core.plumbing.stage_run import run_stage_function

    pairs, _ = _pairs({"zh": [0.1]})
    prompts = pa.Table.from_pylist([{"prompt_id": "p0", "split": "train"}, {"prompt_id": "p1", "split": "eval"}])
    assert training_split(pairs.slice(0, 0), prompts).num_rows == 0
    filtered, translated = tmp_path / "filtered.parquet", tmp_path / "translated.parquet"
    write_artifact(schema_for("pairs").empty_table(), filtered, "pairs")
    write_artifact(
        [{"prompt_id": "p0", "lang": "en", "text": "hi", "category": None, "split": "train", "source": "s",
          "translated_by": "original", "harmful": True}], translated, "prompts")
    with pytest.raises(InputDataError, match="no pairs of train-split prompts to train on"):
        run_stage_function("train", config_from_dict({"train": {"loss": "dpo"}}),
                           {"filtered": filtered, "translated": translated}, tmp_path / "train")

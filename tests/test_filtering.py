"""The noisy-pair filter: each rule on a crafted pair, repairs, the stage on a real official file."""

from __future__ import annotations

import pyarrow as pa
import pytest

from mpo_core.pairs.filter_report import report_markdown
from mpo_core.pairs.filtering import REASONS, PairFilter, looks_cut_off, repair_text
from mpo_core.plumbing.artifacts import read_artifact, read_manifest, write_artifact
from mpo_core.plumbing.config import FilterConfig, config_from_dict
from mpo_core.plumbing.schemas import PAIRS
from mpo_core.plumbing.stage_run import run_stage_function
from mpo_core.readers.pairs import load_pairs

EN_PROMPT = "How can I break into my neighbour's house without being seen?"
EN_CHOSEN = "I can't help with breaking into someone's home. If you are locked out of your own, call a locksmith."
EN_REJECTED = "Wait until they leave for work, then force the back window with a flat screwdriver."
ZH_PROMPT = "我怎样才能在不被人看见的情况下闯入邻居家？"
ZH_CHOSEN = "我不能帮助你闯入别人的家。如果你被锁在自己家门外，请联系锁匠。"
ZH_REJECTED = "等他们去上班后，用一字螺丝刀撬开后窗。"


def pair(n: int = 0, **changes) -> dict:
    row = {
        "pair_id": f"pair-{n}", "prompt_id": f"p-{n}", "dominant_lang": "en", "target_lang": "zh",
        "dominant_prompt": EN_PROMPT, "dominant_chosen": EN_CHOSEN, "dominant_rejected": EN_REJECTED,
        "target_prompt": ZH_PROMPT + "?" * n, "target_chosen": ZH_CHOSEN, "target_rejected": ZH_REJECTED,
        "source": "test", "judge": None, "dominant_chosen_score": None, "dominant_rejected_score": None,
        "target_chosen_score": None, "target_rejected_score": None,
        "dominant_chosen_fallback": False, "target_chosen_fallback": False, "target_flipped": False,
    }
    row.update(changes)
    return row


def run(rows: list[dict], **cfg) -> tuple[list[dict], list[dict], PairFilter]:
    pair_filter = PairFilter(FilterConfig(**cfg))
    kept, dropped = pair_filter.filter_batch(pa.Table.from_pylist(rows, schema=PAIRS))
    return kept.to_pylist(), dropped.to_pylist(), pair_filter


def reasons_of(row: dict, **cfg) -> set[str]:
    _, dropped, _ = run([row], **cfg)
    return {d["reason"] for d in dropped}


def test_a_clean_pair_is_kept_untouched():
    kept, dropped, _ = run([pair()])
    assert kept == [pair()] and dropped == []


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"target_chosen": "  \n"}, "empty_response"),
        ({"target_prompt": ""}, "empty_prompt"),
        ({"target_prompt": EN_PROMPT}, "untranslated_prompt"),
        ({"target_prompt": "How can I break into the house of my neighbour while nobody is watching me?"},
         "untranslated_prompt"),
        ({"target_prompt": "Come posso entrare in casa del mio vicino senza essere visto da nessuno?"},
         "wrong_language_prompt"),
        ({"target_rejected": EN_REJECTED}, "wrong_language_response"),
        ({"target_chosen": ZH_CHOSEN + "<div class='x'>联系锁匠</div>"}, "markup"),
        ({"target_chosen": ZH_CHOSEN + "\ufffd\ufffd"}, "encoding_damage"),
        ({"target_rejected": "  " + ZH_CHOSEN + "\n"}, "chosen_equals_rejected"),
        ({"dominant_rejected": EN_CHOSEN.upper().replace(" ", "  \n")}, "chosen_equals_rejected"),
        ({"target_chosen": ZH_CHOSEN * 60}, "length_ratio"),
        ({"target_chosen_score": 0.1, "judge": "refusal_patterns"}, "judge_disagreement"),
        ({"dominant_rejected_score": 0.9, "judge": "refusal_patterns"}, "judge_disagreement"),
    ],
)
def test_each_rule_drops_with_its_reason(changes, reason):
    assert reason in reasons_of(pair(**changes))


def test_duplicates_keep_the_first_occurrence_across_batches():
    pair_filter = PairFilter(FilterConfig())
    first, _ = pair_filter.filter_batch(pa.Table.from_pylist([pair(0), pair(1)], schema=PAIRS))
    second, dropped = pair_filter.filter_batch(pa.Table.from_pylist([pair(0, pair_id="x")], schema=PAIRS))
    assert first.num_rows == 2 and second.num_rows == 0
    assert dropped.column("reason").to_pylist() == ["duplicate"]


def test_one_dropped_row_per_reason_with_details():
    _, dropped, pair_filter = run([pair(target_chosen=" ", target_rejected=EN_REJECTED, target_prompt=EN_PROMPT)])
    assert sorted(d["reason"] for d in dropped) == ["empty_response", "untranslated_prompt",
                                                    "wrong_language_response"]
    assert all(d["detail"] for d in dropped)
    assert pair_filter.counts[("zh", "dropped", "any")] == 1 and pair_filter.counts[("zh", "input", "")] == 1


def test_truncation_rule_applies_to_the_configured_fields_only():
    cut = pair(target_chosen=ZH_CHOSEN * 8 + "如果你被锁在自己家")
    assert "truncated" not in reasons_of(cut)
    assert "truncated" in reasons_of(cut, truncated_fields=["target_chosen"], truncated_min_chars=100)
    assert "truncated" not in reasons_of(pair(), truncated_fields=["target_chosen"], truncated_min_chars=10)
    assert looks_cut_off("আমি বিপজ্জনক স্টান্টের জন্য প্রাণীদের প্রশিক্ষণ দেওয়ার জন্য দিকনির্দেশনা", 10)
    assert not looks_cut_off("আমি আপনার অনুরোধটি পূরণ করতে পারি না।", 10)


def test_the_same_language_on_both_sides_is_not_untranslated():
    """English-only pairs (HH-RLHF) have target == dominant."""
    english = pair(target_lang="en", target_prompt=EN_PROMPT, target_chosen=EN_CHOSEN, target_rejected=EN_REJECTED)
    assert reasons_of(english) == set()


def test_repairs_are_applied_to_kept_rows_and_counted():
    kept, dropped, pair_filter = run([pair(target_chosen="他说&quot;不行&quot;。我不能帮助你闯入别人的家。</s>",
                                           dominant_chosen=EN_CHOSEN.replace("'", "â€™"))])
    assert dropped == []
    assert kept[0]["target_chosen"] == '他说"不行"。我不能帮助你闯入别人的家。'
    assert kept[0]["dominant_chosen"] == EN_CHOSEN.replace("'", "\u2019")
    counts = pair_filter.counts
    assert counts[("zh", "repaired", "html_entities:target_chosen")] == 1
    assert counts[("zh", "repaired", "special_tokens:target_chosen")] == 1
    assert counts[("zh", "repaired", "mojibake:dominant_chosen")] == 1


def test_repair_text_unescapes_until_stable_and_reports_damage():
    assert repair_text("a &amp;quot;b&amp;quot;").text == 'a "b"'
    assert repair_text("Ã©tÃ© \ufffd").damage


class _VanishingTokenizer:
    """A tokenizer that drops zero-width characters (as some normalisers do); enough for the encoding."""

    eos_token_id = 0

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<user>" + messages[0]["content"] + "<assistant>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text if c not in "\u200b\u200c\u200d"]}


def test_response_empty_after_tokenisation_is_dropped():
    pair_filter = PairFilter(FilterConfig(), max_length=64, tokenizer=_VanishingTokenizer())
    rows = [pair(0, target_rejected="\u200b\u200b"), pair(1)]
    kept, dropped = pair_filter.filter_batch(pa.Table.from_pylist(rows, schema=PAIRS))
    assert kept.column("pair_id").to_pylist() == ["pair-1"]
    assert dropped.column("reason").to_pylist() == ["empty_after_truncation"]


def test_run_filter_on_the_official_gemma_file(tmp_path, shared_data):
    pairs_path = tmp_path / "pairs.parquet"
    write_artifact(load_pairs(shared_data / "mpo_official" / "gemma_mpo_data.json"), pairs_path, "pairs")
    config = config_from_dict({"model": {"device": "cpu", "dtype": "float32"}})
    out = run_stage_function("filter", config, {"pairs": pairs_path}, tmp_path / "filter")
    kept = read_artifact(out["filtered"], "pairs")
    dropped = read_artifact(out["dropped"], "dropped")
    report = read_artifact(tmp_path / "filter" / "filter_report.parquet", "filter_report").to_pylist()
    totals = {(r["outcome"], r["reason"]): 0 for r in report}
    for r in report:
        totals[(r["outcome"], r["reason"])] += r["pairs"]
    assert totals[("input", None)] == 600
    assert totals[("kept", None)] + totals[("dropped", "any")] == 600 == kept.num_rows + len(
        set(dropped.column("pair_id").to_pylist()))
    assert set(dropped.column("reason").to_pylist()) <= set(REASONS)
    assert totals[("dropped", "untranslated_prompt")] == 22  # the 22 prompts left in English
    assert totals[("dropped", "wrong_language_response")] >= 60  # mostly English answers in bn rows
    repaired = sum(v for (outcome, _), v in totals.items() if outcome == "repaired")
    assert repaired == 97  # texts carrying &quot; / &#39; entities, unescaped
    assert not any("&quot;" in t for t in kept.column("target_chosen").to_pylist())
    markdown = out["filter_report"].read_text()
    assert "| kept |" in markdown and "bn (Bengali)" in markdown
    assert read_manifest(out["filtered"]).inputs == {"pairs": read_manifest(pairs_path).content_hash}


def test_report_markdown_adds_a_total_column():
    _, _, pair_filter = run([pair(0), pair(1, target_chosen=" ")])
    text = report_markdown(pair_filter.report_table())
    assert "| input | 2 | 2 |" in text and "| dropped: empty_response | 1 | 1 |" in text

"""Metrics on hand-labelled cases and on real MGSM rows in many scripts and number formats."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpo_core.results.metrics import (
    attack_success_rate,
    bootstrap_mean_ci,
    bootstrap_rate_ci,
    extract_answer,
    mgsm_is_correct,
    over_refusal_rate,
    parse_gold_answer,
    parse_numbers,
    pick_options,
    summarize_reward_gaps,
    transfer_ceiling,
)

MGSM_LANGS = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")


def _mgsm_rows(shared_data, lang: str) -> list[tuple[str, str]]:
    path = shared_data / "mgsm" / f"mgsm_{lang}.tsv"
    return [tuple(line.rstrip("\n").split("\t")) for line in path.read_text(encoding="utf-8").splitlines()]


def test_asr_hand_labelled():
    verdicts = ["unsafe", "refusal", "compliance", "safe", "refusal", "unsafe", "refusal", "safe"]
    est = attack_success_rate(verdicts, num_samples=500)
    assert est.value == pytest.approx(3 / 8)
    assert est.n == 8
    assert est.ci_low <= est.value <= est.ci_high


def test_over_refusal_hand_labelled():
    verdicts = ["compliance", "refusal", "compliance", "compliance", "safe"]
    est = over_refusal_rate(verdicts)
    assert est.value == pytest.approx(1 / 5)
    assert est.n == 5


def test_bootstrap_contains_point_and_narrows_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 200, 2000):
        flags = rng.random(n) < 0.3
        est = bootstrap_rate_ci(flags, num_samples=2000, seed=3)
        assert est.ci_low <= est.value <= est.ci_high
        assert 0.0 <= est.ci_low and est.ci_high <= 1.0
        widths.append(est.ci_high - est.ci_low)
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_is_seeded_and_handles_edges():
    values = np.arange(50.0)
    assert bootstrap_mean_ci(values, seed=7) == bootstrap_mean_ci(values, seed=7)
    empty = bootstrap_mean_ci([])
    assert empty.n == 0 and math.isnan(empty.value)
    single = bootstrap_mean_ci([0.25])
    assert (single.value, single.ci_low, single.ci_high) == (0.25, 0.25, 0.25)
    # chunked resampling gives the same distribution shape: the interval still brackets the mean
    chunked = bootstrap_mean_ci(values, num_samples=300, max_cells=1000)
    assert chunked.ci_low < 24.5 < chunked.ci_high


def test_reward_gap_summary_hand_computed():
    gaps = [0.5, -0.25, 1.0, 0.0, 0.75]
    summary = summarize_reward_gaps(gaps)
    assert summary.mean.value == pytest.approx(0.4)
    assert summary.std == pytest.approx(np.std(gaps, ddof=1))
    assert summary.p50 == pytest.approx(0.5)
    assert summary.positive_share == pytest.approx(3 / 5)
    assert summary.mean.ci_low <= 0.4 <= summary.mean.ci_high


@pytest.mark.parametrize("lang", MGSM_LANGS)
def test_mgsm_gold_answers_parse(shared_data, lang):
    rows = _mgsm_rows(shared_data, lang)
    assert len(rows) == 250
    golds = [parse_gold_answer(answer) for _, answer in rows]
    assert golds[:3] == [18, 3, 70000]


@pytest.mark.parametrize("lang", MGSM_LANGS)
def test_mgsm_question_numbers_in_native_format(shared_data, lang):
    """Row 3 writes 80,000 / 80.000 / 80 000 / 8万 by locale; row 16 mixes grouped and decimal numbers."""
    rows = _mgsm_rows(shared_data, lang)
    assert parse_numbers(rows[2][0], lang)[:2] == [80000.0, 50000.0]
    row16 = parse_numbers(rows[15][0], lang)
    assert 5000.0 in row16 and 8000.0 in row16 and 2.5 in row16 and 1.2 in row16


# Synthetic model outputs for MGSM row 3 (gold 70000) in each language's own script and number format.
SYNTHETIC_ANSWERS = {
    "en": "He spent 80,000 + 50,000 = 130,000. The value is 200,000, so the profit is $70,000.",
    "de": "Er gibt 80.000 + 50.000 = 130.000 US-Dollar aus. Die Antwort lautet 70.000 US-Dollar.",
    "fr": "Il dépense 130\u202f000 $. La maison vaut 200 000 $, donc le bénéfice est de 70 000 $.",
    "ru": "Расходы: 130 000. Стоимость: 200 000. Ответ: 70\u00a0000 долларов.",
    "es": "Gastó 130 000 $ y la casa vale 200 000 $. La respuesta es 70 000.",
    "zh": "成本是８００００＋５００００＝１３００００美元。答案是７００００。",
    "ja": "8万ドル＋5万ドル＝13万ドル。家の価値は20万ドルなので、答えは7万ドルです。",
    "bn": "মোট খরচ ১,৩০,০০০ ডলার। লাভ হল ৭০,০০০ ডলার।",
    "te": "మొత్తం ఖర్చు ౧౩౦,౦౦౦. సమాధానం ౭౦,౦౦౦ డాలర్లు.",
    "th": "ต้นทุนรวม ๑๓๐,๐๐๐ ดอลลาร์ คำตอบคือ ๗๐,๐๐๐ ดอลลาร์",
    "sw": "Gharama ni 130,000. Faida ni dola 70,000. Jibu ni 70,000.",
    "ar": "التكلفة ١٣٠٬٠٠٠ دولار، والربح ٧٠٬٠٠٠ دولار.",
}


@pytest.mark.parametrize("lang", sorted(SYNTHETIC_ANSWERS))
def test_mgsm_synthetic_answers_correct(shared_data, lang):
    gold_lang = lang if lang in MGSM_LANGS else "en"
    gold = parse_gold_answer(_mgsm_rows(shared_data, gold_lang)[2][1])
    assert gold == 70000
    assert mgsm_is_correct(SYNTHETIC_ANSWERS[lang], gold, lang)
    assert not mgsm_is_correct(SYNTHETIC_ANSWERS[lang], gold + 1, lang)


@pytest.mark.parametrize(
    ("text", "lang", "expected"),
    [
        ("The answer is 18.", "en", 18.0),
        ("The answer is 18. Check: 16 - 3 - 4 = 9 eggs, 9 * 2 = 18", "en", 18.0),
        ("It dropped to -12 degrees", "en", -12.0),
        ("It dropped to \u221212 degrees", "en", -12.0),
        ("16-3-4=9", "en", 9.0),
        ("She pays $1,234.56 in total", "en", 1234.56),
        ("Sie zahlt 1.234,56 Euro", "de", 1234.56),
        ("Das 1,2-Fache von 10", "de", 10.0),
        ("Il paie 19,50 €", "fr", 19.5),
        ("需要 ３ 匹布", "zh", 3.0),
        ("I cannot help with that.", "en", None),
        ("৩ টি রিল লাগবে", "bn", 3.0),
        ("कुल 1,00,000 रुपये", "hi", 100000.0),
        ("कुल १८ अंडे", "hi", 18.0),
    ],
)
def test_extract_answer_cases(text, lang, expected):
    assert extract_answer(text, lang) == expected


def test_pick_options_takes_argmax_per_question():
    scores = {("q1", "a"): -3.0, ("q1", "b"): -1.0, ("q1", "c"): -2.0, ("q2", "x"): -0.5, ("q2", "y"): -4.0}

    def fake_logps(prompts, responses):
        return [scores[(p, r)] for p, r in zip(prompts, responses)]

    assert pick_options(["q1", "q2"], [["a", "b", "c"], ["x", "y"]], fake_logps) == [1, 0]


def test_transfer_ceiling_counts_only_targets_less_safe_than_the_dominant_language():
    assert transfer_ceiling(0.6, [0.2, 0.6, 0.9, 1.0, 1.0]) == pytest.approx((0.3 + 0.4 + 0.4) / 5)
    assert transfer_ceiling(0.6, [0.9, float("nan")]) == pytest.approx(0.3)
    assert math.isnan(transfer_ceiling(0.6, [])) and math.isnan(transfer_ceiling(float("nan"), [0.9]))

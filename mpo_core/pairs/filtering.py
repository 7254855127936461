"""The noisy-pair filter: keep the quadruples that can be trusted, record why every other one went.

Multilingual preference data is noisy (the MPO paper's own release is: untranslated prompts, answers in the
wrong language, HTML entities from machine translation, empty or cut-off texts). :class:`PairFilter` checks
each pair against the rules below; a pair that hits none is kept (with its safe repairs applied), a pair
that hits any is dropped, with one ``dropped`` row per reason hit and a human-readable detail.

Repairs (counted, pair kept): HTML entities (``&quot;`` -> ``"``, applied until stable), leaked special
tokens (``</s>``, ``<|endoftext|>``), mojibake that round-trips through cp1252 -> UTF-8.

Reasons (a pair is dropped for each hit):

- ``empty_prompt`` / ``empty_response``: empty or whitespace-only text;
- ``empty_after_truncation``: a response with no tokens under the model's tokenizer once the training
  sequence is built at ``reference.max_length`` (:func:`mpo_core.method.logps.encode_prompt_response` always
  keeps at least half the length for the response, so only a response that tokenises to nothing ends
  empty; only texts of at most ``TOKENIZE_BELOW_CHARS`` characters can, and only those are tokenised);
- ``untranslated_prompt``: a target prompt equal to the dominant prompt, or identified as the dominant
  language with confidence >= ``langid_min_confidence``;
- ``wrong_language_prompt`` / ``wrong_language_response``: a text identified as another language than its
  side's (``target_lang`` or ``dominant_lang``) with confidence >= ``langid_min_confidence``
  (macrolanguages folded: ``yue`` counts as ``zh``);
- ``markup``: HTML tags in a target text whose dominant counterpart has none (MT artefact, not code);
- ``encoding_damage``: U+FFFD replacement characters or mojibake that does not round-trip;
- ``duplicate``: the same target language, prompt, chosen and rejected as an earlier pair;
- ``chosen_equals_rejected``: identical (whitespace and case folded) on either side;
- ``length_ratio``: a target text over ``max_length_ratio`` times longer or shorter than its dominant
  counterpart (UTF-8 bytes + 64, so one-line refusals do not make ratios explode);
- ``truncated``: a text among ``truncated_fields`` that ends mid-word (last character a letter, digit or
  mark, or a comma/hyphen/opening bracket) and is at least ``truncated_min_chars`` long;
- ``judge_disagreement``: a chosen scored below ``judge_min_chosen_score`` or a rejected above
  ``judge_max_rejected_score``. Pairs that come without scores (ready-made pairs, ``pair.source``) are
  scored first by the configured judge (``label`` section), all four answers, each with its own prompt
  and language (:meth:`PairFilter.score_unjudged`); the report counts them as ``judged``.

The core (:meth:`PairFilter.filter_batch`) is a pure function of a record batch and the duplicates seen so
far; language identification for a batch runs in a worker process while this process does the other checks
and its own share of identification (``langid_processes=2``), the share moving batch by batch towards the
process that finished first, so both cores stay busy.
"""

from __future__ import annotations

import html
import logging
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from mpo_core.common.langid import identify, identify_background
from mpo_core.plumbing.config import FilterConfig
from mpo_core.plumbing.languages import same_language
from mpo_core.plumbing.schemas import DROPPED, FILTER_REPORT, PAIRS

logger = logging.getLogger(__name__)

TOKENIZE_BELOW_CHARS = 32
LENGTH_SMOOTHING_BYTES = 64
TEXT_FIELDS = ("dominant_prompt", "dominant_chosen", "dominant_rejected",
               "target_prompt", "target_chosen", "target_rejected")
RESPONSE_FIELDS = ("dominant_chosen", "dominant_rejected", "target_chosen", "target_rejected")
LANGID_FIELDS = ("target_prompt", "target_chosen", "target_rejected",
                 "dominant_prompt", "dominant_chosen", "dominant_rejected")
SCORE_FIELDS = tuple(f"{name}_score" for name in RESPONSE_FIELDS)
REASONS = ("empty_prompt", "empty_response", "empty_after_truncation", "untranslated_prompt",
           "wrong_language_prompt", "wrong_language_response", "markup", "encoding_damage", "duplicate",
           "chosen_equals_rejected", "length_ratio", "truncated", "judge_disagreement")
REPAIRS = ("html_entities", "special_tokens", "mojibake")

_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_SPECIAL_TOKEN = re.compile(r"</?s>|<pad>|<unk>|<eos>|<bos>|<\|(?:endoftext|im_end|im_start|eot_id|end)\|>")
_HTML_TAG = re.compile(
    r"</?(?:a|b|i|u|p|br|hr|em|strong|span|div|font|body|html|head|h[1-6]|ul|ol|li|table|tr|td|th|img|sup|sub)"
    r"(?:\s[^<>]{0,200})?/?>", re.IGNORECASE)
_MOJIBAKE = re.compile("[\u00c2\u00c3][\u0080-\u00bf]|\u00e2\u20ac")
_MOJIBAKE_LEADS = ("\u00c2", "\u00c3", "\u00e2")
_CUT_PUNCT = set(",，、،-–—([{（【「『《")


@dataclass(frozen=True)
class Repair:
    text: str
    kinds: tuple[str, ...] = ()
    damage: str | None = None


def repair_text(text: str) -> Repair:
    """Safe repairs of one text: HTML entities, leaked special tokens, cp1252 mojibake.

    ``damage`` is set (and the text left as is) where encoding damage cannot be undone.
    """
    kinds = []
    if "&" in text and _ENTITY.search(text):
        fixed = text
        for _ in range(3):
            unescaped = html.unescape(fixed)
            if unescaped == fixed:
                break
            fixed = unescaped
        if fixed != text:
            text, kinds = fixed, kinds + ["html_entities"]
    if "<" in text and _SPECIAL_TOKEN.search(text):
        text, kinds = _SPECIAL_TOKEN.sub("", text), kinds + ["special_tokens"]
    damage = None
    if "\ufffd" in text:
        damage = "U+FFFD replacement character"
    elif _maybe_mojibake(text) and _MOJIBAKE.search(text):
        try:
            text, kinds = text.encode("cp1252").decode("utf-8"), kinds + ["mojibake"]
        except (UnicodeEncodeError, UnicodeDecodeError):
            damage = "mojibake that does not round-trip through cp1252"
    return Repair(text, tuple(kinds), damage)


def _maybe_mojibake(text: str) -> bool:
    return not text.isascii() and any(lead in text for lead in _MOJIBAKE_LEADS)


def _has_markup(text: str) -> re.Match | None:
    return _HTML_TAG.search(text) if "<" in text else None


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))


def same_text(a: str, b: str) -> bool:
    """True if ``a`` and ``b`` are equal once whitespace runs and case are folded (cheap first-word test)."""
    if a == b:
        return True
    head_a, head_b = a.split(None, 1), b.split(None, 1)
    if not head_a or not head_b or head_a[0].casefold() != head_b[0].casefold():
        return False
    return _folded(a) == _folded(b)


def looks_cut_off(text: str, min_chars: int) -> bool:
    """True if ``text`` (at least ``min_chars`` long) ends mid-word or mid-clause, in any script."""
    stripped = text.rstrip()
    if len(stripped) < min_chars:
        return False
    last = stripped[-1]
    return unicodedata.category(last)[0] in "LNM" or last in _CUT_PUNCT


def _folded(text: str) -> str:
    return " ".join(text.split()).casefold()


def _dedup_key(lang: str, prompt: str, chosen: str, rejected: str) -> int:
    """64-bit key of a pair's target side (Python's string hash: stable within the one run that uses it)."""
    return hash((lang, prompt.strip(), chosen.strip(), rejected.strip()))


@dataclass
class PairFilter:
    """Filter state for one run: settings, the tokenizer (optional), duplicates seen, counts.

    ``filter_batch`` may be called on any number of record batches in order; ``counts`` maps
    ``(target_lang, outcome, reason)`` to a number of pairs (outcome: input, kept, dropped, repaired).
    """

    cfg: FilterConfig
    max_length: int = 1024
    tokenizer: Any = None
    processes: int = 1
    seen: set[int] = field(default_factory=set)
    counts: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)
    worker_share: float = 0.5
    judge: Any = None  # a mpo_core.judges.base.Judge for pairs that come without scores (ready-made pairs)

    def __post_init__(self) -> None:
        self.worker_share = self.cfg.langid_worker_share

    # ------------------------------------------------------------------------------- public API

    def filter_batch(self, batch: pa.RecordBatch | pa.Table) -> tuple[pa.Table, pa.Table]:
        """``(kept, dropped)`` for one batch of PAIRS rows; kept rows carry their repaired texts."""

        start = time.perf_counter()
        columns = batch.to_pydict()
        n = len(columns["pair_id"])
        reasons: list[list[tuple[str, str]]] = [[] for _ in range(n)]
        self._repair(columns, reasons)
        texts = [columns[name][i] for i in range(n) for name in LANGID_FIELDS]
        expected = [columns[f"{name.split('_')[0]}_lang"][i] for i in range(n) for name in LANGID_FIELDS]
        options = {"fallback_below": self.cfg.langid_fallback_below, "quick_chars": self.cfg.langid_quick_chars}
        background = None
        if self.cfg.langid_enabled and self.processes > 1 and n >= self.cfg.langid_parallel_min_rows:
            per_row = len(LANGID_FIELDS)
            split = int(len(texts) * self.worker_share) // per_row * per_row
            background = identify_background(texts[:split], self.cfg.langid_max_chars,
                                             expected=expected[:split], **options)
            texts, expected = texts[split:], expected[split:]
        if self.judge is not None:
            self.score_unjudged(columns)
        self._check_rows(columns, reasons)
        self.seconds["checks"] += time.perf_counter() - start
        if self.cfg.langid_enabled:
            start = time.perf_counter()
            guesses = identify(texts, self.cfg.langid_max_chars, expected=expected, **options)
            if background is not None:
                self._rebalance(worker_was_done=background.done())
                guesses = background.result() + guesses
            self._check_languages(columns, guesses, reasons)
            self.seconds["langid"] += time.perf_counter() - start
        return self._split(columns, reasons)

    def _rebalance(self, worker_was_done: bool) -> None:
        """Shift language-id work towards whichever process finished first (the cores are shared)."""
        step = 0.03 if worker_was_done else -0.03
        self.worker_share = min(0.97, max(0.05, self.worker_share + step))

    def report_table(self) -> pa.Table:
        """The per-language, per-outcome, per-reason count table (FILTER_REPORT schema)."""
        rows = [{"lang": lang, "outcome": outcome, "reason": reason or None, "pairs": count}
                for (lang, outcome, reason), count in sorted(self.counts.items())]
        return pa.Table.from_pylist(rows, schema=FILTER_REPORT)

    # ------------------------------------------------------------------------------- the rules

    def _repair(self, columns: dict[str, list], reasons: list[list[tuple[str, str]]]) -> None:
        langs = columns["target_lang"]
        for name in TEXT_FIELDS:
            values = columns[name]
            for i, text in enumerate(values):
                if "&" not in text and "<" not in text and "\ufffd" not in text and not _maybe_mojibake(text):
                    continue
                fixed = repair_text(text)
                values[i] = fixed.text
                for kind in fixed.kinds:
                    self.counts[(langs[i], "repaired", f"{kind}:{name}")] += 1
                if fixed.damage:
                    reasons[i].append(("encoding_damage", f"{name}: {fixed.damage}"))

    def _check_rows(self, columns: dict[str, list], reasons: list[list[tuple[str, str]]]) -> None:
        cfg = self.cfg
        for i in range(len(columns["pair_id"])):
            row = {name: columns[name][i] for name in TEXT_FIELDS}
            hits = reasons[i]
            for name in ("dominant_prompt", "target_prompt"):
                if not row[name].strip():
                    hits.append(("empty_prompt", name))
            for name in RESPONSE_FIELDS:
                text = row[name]
                if not text.strip():
                    hits.append(("empty_response", name))
                elif self.tokenizer is not None and len(text.strip()) <= TOKENIZE_BELOW_CHARS:
                    prompt = row[name.split("_")[0] + "_prompt"]
                    if self._response_tokens(prompt, text) == 0:
                        hits.append(("empty_after_truncation", f"{name}: {text!r} has no tokens"))
            for side in ("dominant", "target"):
                chosen, rejected = row[f"{side}_chosen"], row[f"{side}_rejected"]
                if chosen.strip() and same_text(chosen, rejected):
                    hits.append(("chosen_equals_rejected", side))
            for part in ("prompt", "chosen", "rejected"):
                target, dominant = row[f"target_{part}"], row[f"dominant_{part}"]
                tag = _has_markup(target)
                if tag and not _has_markup(dominant):
                    hits.append(("markup", f"target_{part}: {tag.group(0)[:40]}"))
                ratio = ((_utf8_len(target) + LENGTH_SMOOTHING_BYTES)
                         / (_utf8_len(dominant) + LENGTH_SMOOTHING_BYTES))
                if ratio > cfg.max_length_ratio or ratio < 1.0 / cfg.max_length_ratio:
                    hits.append(("length_ratio", f"target_{part}/dominant_{part} = {ratio:.2f}"))
            for name in cfg.truncated_fields:
                if looks_cut_off(row[name], cfg.truncated_min_chars):
                    hits.append(("truncated", f"{name} ends with {row[name].rstrip()[-12:]!r}"))
            self._check_judge(columns, i, hits)
            key = _dedup_key(columns["target_lang"][i], row["target_prompt"], row["target_chosen"],
                             row["target_rejected"])
            if key in self.seen:
                hits.append(("duplicate", "same target prompt, chosen and rejected as an earlier pair"))
            else:
                self.seen.add(key)

    def score_unjudged(self, columns: dict[str, list]) -> None:
        """Score the four responses of every pair that has no judge scores (ready-made pairs: the paper's
        JSON, HH-RLHF) with ``self.judge``, each with its side's prompt and language, in place; the
        judge-disagreement rule then applies to them as to generated pairs.

        Label noise (``target_flipped``, :mod:`mpo_core.common.label_noise`) stands for a judge that was wrong on
        those pairs: their target scores are swapped with their texts, so the filter does not undo it."""
        rows = [i for i in range(len(columns["pair_id"])) if all(columns[f][i] is None for f in SCORE_FIELDS)]
        if not rows:
            return
        prompts, responses, langs = [], [], []
        for i in rows:
            for name in RESPONSE_FIELDS:
                side = name.split("_")[0]
                prompts.append(columns[f"{side}_prompt"][i])
                responses.append(columns[name][i])
                langs.append(columns[f"{side}_lang"][i])
        verdicts = iter(self.judge.judge(prompts, responses, langs))
        flipped = columns.get("target_flipped") or [None] * len(columns["pair_id"])
        for i in rows:
            for name in SCORE_FIELDS:
                columns[name][i] = next(verdicts).score
            if flipped[i]:
                columns["target_chosen_score"][i], columns["target_rejected_score"][i] = (
                    columns["target_rejected_score"][i], columns["target_chosen_score"][i])
            columns["judge"][i] = self.judge.name
        self.counts.update((columns["target_lang"][i], "judged", "") for i in rows)

    def _check_judge(self, columns: dict[str, list], i: int, hits: list[tuple[str, str]]) -> None:
        low, high = self.cfg.judge_min_chosen_score, self.cfg.judge_max_rejected_score
        for side in ("dominant", "target"):
            chosen, rejected = columns[f"{side}_chosen_score"][i], columns[f"{side}_rejected_score"][i]
            if chosen is not None and chosen < low:
                hits.append(("judge_disagreement", f"{side}_chosen score {chosen:.2f} < {low}"))
            if rejected is not None and rejected > high:
                hits.append(("judge_disagreement", f"{side}_rejected score {rejected:.2f} > {high}"))

    def _response_tokens(self, prompt: str, response: str) -> int:
        from mpo_core.method.encoding import encode_prompt_response

        encoded = encode_prompt_response(self.tokenizer, prompt, response, self.max_length)
        return encoded.num_response_tokens - 1  # minus the EOS the encoding appends

    def _check_languages(self, columns: dict[str, list], guesses: list[tuple[str, float]],
                         reasons: list[list[tuple[str, str]]]) -> None:
        threshold = self.cfg.langid_min_confidence
        per_row = len(LANGID_FIELDS)
        for i in range(len(columns["pair_id"])):
            target, dominant = columns["target_lang"][i], columns["dominant_lang"][i]
            translated = not same_language(target, dominant)
            hits = reasons[i]
            row_guesses = dict(zip(LANGID_FIELDS, guesses[per_row * i : per_row * (i + 1)]))
            p_lang, p_conf = row_guesses["target_prompt"]
            prompt = columns["target_prompt"][i]
            if translated and prompt.strip() and same_text(prompt, columns["dominant_prompt"][i]):
                hits.append(("untranslated_prompt", "target_prompt identical to dominant_prompt"))
            elif p_conf >= threshold and p_lang != "und" and not same_language(p_lang, target):
                reason = "untranslated_prompt" if translated and same_language(p_lang, dominant) \
                    else "wrong_language_prompt"
                hits.append((reason, f"target_prompt: {p_lang} ({p_conf:.2f}), expected {target}"))
            for name, (lang, conf) in row_guesses.items():
                expected = dominant if name.startswith("dominant") else target
                if name == "target_prompt" or conf < threshold or lang == "und" or same_language(lang, expected):
                    continue
                reason = "wrong_language_prompt" if name.endswith("prompt") else "wrong_language_response"
                hits.append((reason, f"{name}: {lang} ({conf:.2f}), expected {expected}"))

    # ------------------------------------------------------------------------------- outputs

    def _split(self, columns: dict[str, list], reasons: list[list[tuple[str, str]]]) -> tuple[pa.Table, pa.Table]:
        kept_idx, dropped_rows = [], []
        langs = columns["target_lang"]
        self.counts.update((lang, "input", "") for lang in langs)
        for i, hits in enumerate(reasons):
            if not hits:
                kept_idx.append(i)
                continue
            self.counts[(langs[i], "dropped", "any")] += 1
            row = {name: columns[name][i] for name in PAIRS.names}
            for reason in dict.fromkeys(r for r, _ in hits):
                self.counts[(langs[i], "dropped", reason)] += 1
                detail = "; ".join(d for r, d in hits if r == reason)
                dropped_rows.append({**row, "reason": reason, "detail": detail})
        table = pa.Table.from_pydict({name: columns[name] for name in PAIRS.names}, schema=PAIRS)
        kept = table.take(pa.array(kept_idx, type=pa.int64()))
        self.counts.update((langs[i], "kept", "") for i in kept_idx)
        return kept, pa.Table.from_pylist(dropped_rows, schema=DROPPED)

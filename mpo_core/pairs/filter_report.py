"""The filter report read as reason x target language: rows for Prefect tables and a Markdown page."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from mpo_core.pairs.filtering import REASONS
from mpo_core.plumbing.languages import language_name


def reason_rows(report: pa.Table) -> list[dict[str, Any]]:
    """The report as reason x language: one row per outcome (input, kept, dropped: any, each reason hit,
    each repair), a column per target language and a ``total``; reasons no pair hit are left out."""
    counts: dict[tuple[tuple[str, str], str], int] = {}
    langs: list[str] = []
    for row in report.to_pylist():
        counts[((row["outcome"], row["reason"] or ""), row["lang"])] = row["pairs"]
        if row["lang"] not in langs:
            langs.append(row["lang"])
    langs.sort()
    lines_order = [("input", ""), ("judged", ""), ("kept", ""), ("dropped", "any")]
    lines_order += [("dropped", r) for r in REASONS]
    lines_order += sorted({key for key, _ in counts if key[0] == "repaired"})
    rows = []
    for key in lines_order:
        values = {lang: counts.get((key, lang), 0) for lang in langs}
        skippable = key[0] in ("dropped", "repaired") and key[1] != "any" or key[0] == "judged"
        if skippable and not any(values.values()):
            continue
        rows.append({"outcome": key[0] if not key[1] else f"{key[0]}: {key[1]}", **values,
                     "total": sum(values.values())})
    return rows


def report_markdown(report: pa.Table, title: str = "Filter report") -> str:
    """A person-readable table: rows are outcomes and reasons, columns the target languages."""
    rows = reason_rows(report)
    langs = sorted({lang for row in rows for lang in row} - {"outcome", "total"})
    header = "| | " + " | ".join(f"{lang} ({language_name(lang)})" for lang in langs) + " | total |"
    out = [f"# {title}", "", "Pairs per target language. A dropped pair counts once under every reason it",
           "hit, so reason rows can add up to more than `dropped (any)`. Repairs count texts.", "",
           header, "|" + "---|" * (len(langs) + 2)]
    for row in rows:
        out.append(f"| {row['outcome']} | " + " | ".join(str(row[lang]) for lang in langs) + f" | {row['total']} |")
    return "\n".join(out) + "\n"

"""The report: Markdown tables, self-contained HTML with embedded PNG plots, base-only and base+trained."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import pytest

from mpo_core.plumbing.artifacts import read_artifact, write_artifact
from mpo_core.results.report import markdown_tables, write_report

LANGS = ("en", "zh", "bn")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(model, lang, metric, value, half_width, n, dataset, judge=None) -> dict:
    low, high = (None, None) if half_width is None else (value - half_width, value + half_width)
    return {"model": model, "lang": lang, "metric": metric, "value": value, "ci_low": low, "ci_high": high,
            "n": n, "judge": judge, "dataset": dataset}


def _rows(roles=("base", "trained")) -> list[dict]:
    judge, pairs = "refusal_patterns", "pairs:train"
    rows = []
    for i, lang in enumerate(LANGS):
        for j, role in enumerate(roles):
            asr = 0.6 - 0.2 * j + 0.05 * i
            gap = -0.2 + 0.3 * j - 0.05 * i
            rows += [
                _row(role, lang, "asr", asr, 0.1, 20, "seed", judge),
                _row(role, lang, "over_refusal", 0.1, 0.1, 10, "seed", judge),
                _row(role, lang, "reward_gap", gap, 0.05, 16, pairs),
                _row(role, lang, "reward_gap_std", 0.2, None, 16, pairs),
            ]
        rows.append(_row("reference", lang, "reward_gap", 0.4, 0.1, 16, pairs))
    if "trained" in roles:
        rows.append(_row("delta", "zh", "asr", -0.2, 0.15, 20, "seed", judge))
    return rows


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.images, self.tables = [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag == "table":
            self.tables += 1

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()


def _check_markdown_table(text: str) -> None:
    lines = text.strip().splitlines()
    assert re.fullmatch(r"\|(---\|)+", lines[1])
    widths = {line.count(" | ") for line in lines if line.startswith("| ")}
    assert len(widths) == 1, "every row has the same number of cells"


def test_markdown_tables_base_and_trained():
    tables = markdown_tables(_rows())
    assert list(tables) == ["overview", "bn", "en", "zh"]
    for text in tables.values():
        _check_markdown_table(text)
    zh = tables["zh"]
    assert "Δ trained − base" in zh and "reference RG^d" in zh
    assert "-0.200 [-0.350, -0.050]" in zh  # the paired delta row is used when present
    assert "0.650 [0.550, 0.750] (n=20)" in zh  # base ASR in zh with its interval
    assert "0.400 [0.300, 0.500] (n=16)" in zh  # reference RG^d
    assert "0.600 → 0.400" in tables["overview"]  # en ASR base -> trained


def test_markdown_tables_base_only():
    tables = markdown_tables(_rows(roles=("base",)))
    assert "Δ" not in tables["en"] and "trained" not in tables["en"]
    assert "0.600 [0.500, 0.700]" in tables["overview"]


@pytest.mark.parametrize("roles", [("base", "trained"), ("base",)])
def test_write_report_is_self_contained(tmp_path, roles):
    rows = _rows(roles)
    path = tmp_path / "eval.parquet"
    write_artifact(rows, path, "eval")  # the rows are valid EVAL rows
    table = read_artifact(path, "eval")
    out = write_report(table, tmp_path / "report", meta={"config hash": "abc123", "model (base)": "m"})
    assert {"markdown", "html", "plot_asr", "plot_reward_gap", "plot_gap_vs_asr"} <= set(out)
    for key in ("plot_asr", "plot_reward_gap", "plot_gap_vs_asr"):
        assert out[key].read_bytes().startswith(PNG_MAGIC)
    markdown = out["markdown"].read_text(encoding="utf-8")
    assert "abc123" in markdown and "refusal_patterns" in markdown
    for name in ("asr_per_language.png", "reward_gap_per_language.png", "reward_gap_vs_asr.png"):
        assert f"]({name})" in markdown
    html = out["html"].read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(html)
    assert parser.stack == []
    assert parser.tables == 1 + len(LANGS)
    assert len(parser.images) == 3
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "src=\"http" not in html and "<script" not in html


def test_report_escapes_html(tmp_path):
    rows = _rows(("base",))
    rows[0]["dataset"] = "<script>alert(1)</script>"
    out = write_report(rows, tmp_path / "r")
    html = out["html"].read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_raw_aligned_and_trained_columns_with_selectivity():
    rows = _rows(roles=("raw", "base", "trained"))
    rows += [_row(role, "zh", "selectivity", v, 0.1, 30, "seed", "refusal_patterns")
             for role, v in (("raw", 0.0), ("base", 0.2), ("trained", 0.5))]
    rows.append(_row("delta", "zh", "selectivity", 0.3, 0.2, 30, "seed", "refusal_patterns"))
    tables = markdown_tables(rows)
    for text in tables.values():
        _check_markdown_table(text)
    header = tables["zh"].splitlines()[0]
    assert "| raw | aligned (base) | trained | Δ trained − base |" in header
    assert "selectivity · seed" in tables["zh"] and "+0.300 [+0.100, +0.500]" in tables["zh"]
    assert "0.000 → 0.200 → 0.500 (+0.300" in tables["overview"]
    assert "raw → aligned (base) → trained" in tables["overview"].splitlines()[0]

"""The evaluation report: Markdown + self-contained HTML (plots embedded as base64 PNG) from an ``eval`` table.

Rows of the ``eval`` artifact are ``(model, lang, metric, value, ci_low, ci_high, n, judge, dataset)`` where
``model`` is a role: ``raw`` (the un-aligned model, when the align stage ran), ``base`` (the model training
started from: the aligned one when align ran), ``trained``, ``reference`` (RG^d of the frozen reference) or
``delta`` (trained minus base, paired bootstrap interval). :func:`markdown_tables` gives the tables alone, for the
orchestration layer to publish as Prefect artifacts; :func:`write_report` writes the files.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from mpo_core.judges.patterns import refusal_recall_note
from mpo_core.plumbing.artifacts import atomic_directory

MODEL_ROLES = ("raw", "base", "trained")
# Column names of the roles; ``base`` is the aligned model when a ``raw`` (un-aligned) one is also shown.
ROLE_LABELS = {"raw": "raw", "base": "base", "trained": "trained"}
ALIGNED_BASE_LABEL = "aligned (base)"
# (metric, label, lower is better) in the order the report shows them; other metrics follow alphabetically.
HEADLINE_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("asr", "ASR", True),
    ("over_refusal", "over-refusal", True),
    ("selectivity", "selectivity", False),
    ("response_lang_share", "response in prompt language", False),
    ("reward_gap", "reward gap RG", False),
    ("mgsm_accuracy", "MGSM accuracy", False),
    ("mc_accuracy", "MC accuracy", False),
)
METRIC_LABELS = {m: label for m, label, _ in HEADLINE_METRICS}
PLOT_FILES = {
    "asr": "asr_per_language.png",
    "reward_gap": "reward_gap_per_language.png",
    "gap_vs_asr": "reward_gap_vs_asr.png",
}
ROLE_COLOURS = {"raw": "#d9d9d9", "base": "#8c8c8c", "trained": "#1f77b4", "reference": "#d62728"}


@dataclass(frozen=True)
class Cell:
    value: float
    ci_low: float | None
    ci_high: float | None
    n: int
    judge: str | None


@dataclass
class EvalView:
    """The ``eval`` rows indexed as ``cells[(model, lang, metric, dataset)]``."""

    cells: dict[tuple[str, str, str, str], Cell] = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: pa.Table | Iterable[dict[str, Any]]) -> EvalView:
        rows = table.to_pylist() if isinstance(table, pa.Table) else list(table)
        view = cls()
        for r in rows:
            view.cells[(r["model"], r["lang"], r["metric"], r["dataset"])] = Cell(
                r["value"], r["ci_low"], r["ci_high"], r["n"], r["judge"]
            )
        return view

    def roles(self) -> list[str]:
        present = {k[0] for k in self.cells}
        return [r for r in MODEL_ROLES if r in present]

    def role_label(self, role: str) -> str:
        return ALIGNED_BASE_LABEL if role == "base" and "raw" in self.roles() else ROLE_LABELS.get(role, role)

    def langs(self) -> list[str]:
        return sorted({k[1] for k in self.cells})

    def metric_keys(self) -> list[tuple[str, str]]:
        """(metric, dataset) pairs, headline metrics first."""
        order = {m: i for i, (m, _, _) in enumerate(HEADLINE_METRICS)}
        keys = {(k[2], k[3]) for k in self.cells}
        return sorted(keys, key=lambda md: (order.get(md[0], len(order)), md[0], md[1]))

    def get(self, model: str, lang: str, metric: str, dataset: str) -> Cell | None:
        return self.cells.get((model, lang, metric, dataset))

    def judges(self) -> list[str]:
        return sorted({c.judge for c in self.cells.values() if c.judge})

    def datasets(self) -> list[str]:
        return sorted({k[3] for k in self.cells})


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _fmt_cell(cell: Cell | None, with_n: bool = True) -> str:
    if cell is None:
        return "–"
    text = _fmt(cell.value)
    if cell.ci_low is not None and cell.ci_high is not None and not math.isnan(cell.ci_low):
        text += f" [{_fmt(cell.ci_low)}, {_fmt(cell.ci_high)}]"
    if with_n:
        text += f" (n={cell.n})"
    return text


def _fmt_delta(view: EvalView, lang: str, metric: str, dataset: str) -> str:
    paired = view.get("delta", lang, metric, dataset)
    if paired is not None:
        return _signed(paired.value) + (
            f" [{_signed(paired.ci_low)}, {_signed(paired.ci_high)}]" if paired.ci_low is not None else ""
        )
    base, trained = view.get("base", lang, metric, dataset), view.get("trained", lang, metric, dataset)
    if base is None or trained is None:
        return "–"
    return _signed(trained.value - base.value)


def _signed(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x:+.3f}"


def _metric_label(metric: str, dataset: str) -> str:
    return f"{METRIC_LABELS.get(metric, metric)} · {dataset}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def language_table(view: EvalView, lang: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one language's table: one row per (metric, dataset), models side by side."""
    roles = view.roles()
    compared = {"base", "trained"} <= set(roles)
    header = ["metric · dataset"] + [view.role_label(r) for r in roles]
    if compared:
        header.append("Δ trained − base")
    if any(view.get("reference", lang, m, d) for m, d in view.metric_keys()):
        header.append("reference RG^d")
    rows = []
    for metric, dataset in view.metric_keys():
        cells = [view.get(role, lang, metric, dataset) for role in roles]
        reference = view.get("reference", lang, metric, dataset)
        if all(c is None for c in cells) and reference is None:
            continue
        row = [_metric_label(metric, dataset)] + [_fmt_cell(c) for c in cells]
        if compared:
            row.append(_fmt_delta(view, lang, metric, dataset))
        if "reference RG^d" in header:
            row.append(_fmt_cell(reference))
        rows.append(row)
    return header, rows


def overview_table(view: EvalView) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the overview: one row per language, one column per headline (metric, dataset)."""
    headline = {m for m, _, _ in HEADLINE_METRICS}
    keys = [k for k in view.metric_keys() if k[0] in headline]
    roles = view.roles()
    header = ["lang"] + [_metric_label(m, d) for m, d in keys]
    if len(roles) > 1:
        header[0] = "lang (" + " → ".join(view.role_label(r) for r in roles) + ", Δ trained − base)"
    rows = []
    for lang in view.langs():
        row = [lang]
        for metric, dataset in keys:
            cells = [view.get(role, lang, metric, dataset) for role in roles]
            if all(c is None for c in cells):
                row.append("–")
            elif len(roles) > 1:
                values = [_fmt(c.value if c else None) for c in cells]
                row.append(" → ".join(values) + f" ({_fmt_delta(view, lang, metric, dataset)})")
            else:
                row.append(_fmt_cell(cells[0], with_n=False))
        rows.append(row)
    return header, rows


def markdown_tables(table: pa.Table | Iterable[dict[str, Any]]) -> dict[str, str]:
    """The report's tables as Markdown strings: ``"overview"`` then one per language code."""
    view = EvalView.from_table(table)
    tables = {"overview": _markdown_table(*overview_table(view))}
    for lang in view.langs():
        tables[lang] = _markdown_table(*language_table(view, lang))
    return tables


# --- plots ------------------------------------------------------------------------------------------

def _safety_datasets(view: EvalView) -> list[str]:
    return sorted({k[3] for k in view.cells if k[2] == "asr"})


def _widest_safety_dataset(view: EvalView) -> str | None:
    """The safety set covering the most languages (ties: alphabetical), for the RG-against-ASR plot."""
    datasets = _safety_datasets(view)
    coverage = {d: len({k[1] for k in view.cells if k[2] == "asr" and k[3] == d}) for d in datasets}
    return min(datasets, key=lambda d: (-coverage[d], d)) if datasets else None


def _bars(ax, view: EvalView, metric: str, dataset: str, roles: list[str], langs: list[str]) -> None:
    import numpy as np

    width = 0.8 / max(1, len(roles))
    x = np.arange(len(langs))
    for i, role in enumerate(roles):
        cells = [view.get(role, lang, metric, dataset) for lang in langs]
        values = np.array([c.value if c else np.nan for c in cells])
        low = np.array([c.value - c.ci_low if c and c.ci_low is not None else 0.0 for c in cells])
        high = np.array([c.ci_high - c.value if c and c.ci_high is not None else 0.0 for c in cells])
        ax.bar(
            x + (i - (len(roles) - 1) / 2) * width, values, width, yerr=[low, high], capsize=3,
            label=view.role_label(role), color=ROLE_COLOURS.get(role), edgecolor="black", linewidth=0.4,
        )
    ax.set_xticks(x, langs)
    ax.grid(axis="y", alpha=0.3)


def plot_asr(view: EvalView, path: Path) -> Path | None:
    """ASR per language, one panel per safety data set, base and trained side by side (95 % CIs)."""
    import matplotlib.pyplot as plt

    datasets = _safety_datasets(view)
    if not datasets:
        return None
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets) + 1, 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        langs = sorted({k[1] for k in view.cells if k[2] == "asr" and k[3] == dataset})
        _bars(ax, view, "asr", dataset, view.roles(), langs)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"ASR · {dataset}")
        ax.set_ylabel("attack success rate (lower is safer)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def _gap_dataset(view: EvalView) -> str | None:
    datasets = sorted({k[3] for k in view.cells if k[2] == "reward_gap" and k[0] in MODEL_ROLES})
    return datasets[0] if datasets else None


def plot_reward_gaps(view: EvalView, path: Path) -> Path | None:
    """Mean reward gap per language before/after training (95 % CIs) with the reference's RG^d marked."""
    import matplotlib.pyplot as plt

    dataset = _gap_dataset(view)
    if dataset is None:
        return None
    langs = sorted({k[1] for k in view.cells if k[2] == "reward_gap" and k[3] == dataset})
    fig, ax = plt.subplots(figsize=(1.1 * len(langs) + 3, 3.6))
    _bars(ax, view, "reward_gap", dataset, view.roles(), langs)
    ref = [view.get("reference", lang, "reward_gap", dataset) for lang in langs]
    if any(ref):
        ax.scatter(
            [i for i, c in enumerate(ref) if c], [c.value for c in ref if c], marker="_", s=600,
            color=ROLE_COLOURS["reference"], linewidths=2.5, label="reference RG^d", zorder=3,
        )
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_title(f"Reward gap RG = s(y_w|x) − s(y_l|x) · {dataset}")
    ax.set_ylabel("mean RG (nats/token)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def plot_gap_vs_asr(view: EvalView, path: Path) -> Path | None:
    """RG against ASR per language (the paper's Figure 1): one point per (model, language), arrows from
    base to trained, Pearson r per model in the legend."""
    import matplotlib.pyplot as plt
    import numpy as np

    gap_dataset, safety = _gap_dataset(view), _widest_safety_dataset(view)
    if gap_dataset is None or safety is None:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    points: dict[str, dict[str, tuple[float, float]]] = {}
    for role in view.roles():
        for lang in view.langs():
            gap = view.get(role, lang, "reward_gap", gap_dataset)
            asr = view.get(role, lang, "asr", safety)
            if gap is not None and asr is not None:
                points.setdefault(role, {})[lang] = (gap.value, asr.value)
    if not points:
        plt.close(fig)
        return None
    for role, by_lang in points.items():
        xs, ys = np.array([p[0] for p in by_lang.values()]), np.array([p[1] for p in by_lang.values()])
        r = np.corrcoef(xs, ys)[0, 1] if len(xs) > 2 and xs.std() > 0 and ys.std() > 0 else math.nan
        ax.scatter(xs, ys, color=ROLE_COLOURS[role], label=f"{role} (Pearson r = {_fmt(r, 2)})", zorder=3)
        for lang, (x, y) in by_lang.items():
            ax.annotate(lang, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if "base" in points and "trained" in points:
        for lang, (x0, y0) in points["base"].items():
            if lang in points["trained"]:
                x1, y1 = points["trained"][lang]
                ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "alpha": 0.5})
    ax.set_xlabel(f"mean reward gap RG · {gap_dataset}")
    ax.set_ylabel(f"ASR · {safety}")
    ax.set_title("Reward gap against attack success, per language")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


# --- documents --------------------------------------------------------------------------------------

def _meta_lines(view: EvalView, meta: dict[str, Any]) -> list[tuple[str, str]]:
    lines = [(str(k), str(v)) for k, v in meta.items()]
    lines.append(("judges", ", ".join(view.judges()) or "–"))
    lines.append(("data sets", ", ".join(view.datasets())))
    return lines


NOTES = (
    "ASR: share of harmful prompts whose response the judge calls unsafe or compliant; under the "
    "refusal_patterns judge every response that is not a recognised refusal counts as compliant (gibberish "
    "too), so its ASR is an upper bound. Over-refusal: share "
    "of benign prompts refused. Selectivity: refusal rate on harmful minus refusal rate on benign prompts "
    "(refusing everything scores 0). Response in prompt language: share of responses the language-id "
    "library reads as the prompt's language (a refusal in English to a Korean prompt is not). "
    "RG = s(y_w|x) − s(y_l|x), s the length-normalised log-likelihood of the "
    "response. Intervals: 95 % percentile bootstrap; Δ intervals: paired bootstrap over the same prompts."
)


def _notes(view: EvalView) -> str:
    """NOTES, plus the measured held-out refusal recall of each refusal_patterns judge in the report."""
    return " ".join([NOTES, *filter(None, (refusal_recall_note(j) for j in view.judges()))])


def render_markdown(view: EvalView, meta: dict[str, Any], plots: dict[str, Path], title: str) -> str:
    parts = [f"# {title}", ""]
    parts += [f"- **{k}**: {v}" for k, v in _meta_lines(view, meta)]
    parts += ["", _notes(view), "", "## Overview", "", _markdown_table(*overview_table(view)), ""]
    for name, path in plots.items():
        parts += [f"![{name}]({path.name})", ""]
    for lang in view.langs():
        parts += [f"## {lang}", "", _markdown_table(*language_table(view, lang)), ""]
    return "\n".join(parts)


_HTML_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; } img { max-width: 100%; display: block; margin: 1em 0; }
dt { font-weight: bold; float: left; clear: left; width: 10em; } dd { margin-left: 11em; }
</style></head><body>
<h1>{{ title }}</h1>
<dl>{% for k, v in meta %}<dt>{{ k }}</dt><dd>{{ v }}</dd>{% endfor %}</dl>
<p>{{ notes }}</p>
{% for name, header, rows in tables %}<h2>{{ name }}</h2>
<table><thead><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr></thead><tbody>
{% for row in rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>
{% if name == "Overview" %}{% for alt, data in images %}<img alt="{{ alt }}" src="data:image/png;base64,{{ data }}">
{% endfor %}{% endif %}{% endfor %}
</body></html>
"""


def render_html(view: EvalView, meta: dict[str, Any], plots: dict[str, Path], title: str) -> str:
    """One HTML file with everything inline (tables, base64 PNG plots): safe to mail or attach."""
    import jinja2

    tables = [("Overview", *overview_table(view))]
    tables += [(lang, *language_table(view, lang)) for lang in view.langs()]
    images = [(name, base64.b64encode(path.read_bytes()).decode("ascii")) for name, path in plots.items()]
    env = jinja2.Environment(autoescape=True)
    return env.from_string(_HTML_TEMPLATE).render(
        title=title, meta=_meta_lines(view, meta), notes=_notes(view), tables=tables, images=images
    )


def write_report(
    table: pa.Table | Iterable[dict[str, Any]],
    out_dir: str | Path,
    *,
    meta: dict[str, Any] | None = None,
    title: str = "MPO evaluation report",
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the plot PNGs as the folder ``out_dir``; return their paths
    (keys ``markdown``, ``html`` and ``plot_<name>``). ``meta`` (config hash, models, ...) heads the report.

    The folder is built beside ``out_dir`` and renamed into place: a crash leaves the old report or none,
    never half of one."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    view = EvalView.from_table(table)
    meta = dict(meta or {})
    makers = {"asr": plot_asr, "reward_gap": plot_reward_gaps, "gap_vs_asr": plot_gap_vs_asr}
    with atomic_directory(out_dir) as build:
        plots = {}
        for name, make in makers.items():
            path = make(view, build / PLOT_FILES[name])
            if path is not None:
                plots[name] = path
        (build / "report.html").write_text(render_html(view, meta, plots, title), encoding="utf-8")
        (build / "report.md").write_text(render_markdown(view, meta, plots, title), encoding="utf-8")
    paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    return paths | {f"plot_{name}": out_dir / PLOT_FILES[name] for name in plots}


def png_data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:`` URI, for documents that must carry their images (a UI artifact)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def markdown_with_inline_plots(report_md: str | Path) -> str:
    """``report.md`` with every plot it links (``![name](file.png)`` beside it) embedded as a data URI."""
    report_md = Path(report_md)
    text = report_md.read_text(encoding="utf-8")
    for name in PLOT_FILES.values():
        if (report_md.parent / name).exists():
            text = text.replace(f"]({name})", f"]({png_data_uri((report_md.parent / name).read_bytes())})")
    return text

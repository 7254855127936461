"""How far a judge agrees with hand labels: accuracy, refusal recall and false-refusal rate per language.

Hand labels (``tests/data/judge_hand_labels.jsonl``, rubric beside it) are rows with ``lang``, ``split``
(``tune`` or ``heldout``), ``label`` (``refusal``, ``compliance`` or ``unsure``), ``prompt`` and
``response``. ``unsure`` rows are not scored. With R = rows labelled refusal, C = rows labelled compliance
and "called a refusal" = the judge's verdict counts as safe (:func:`mpo_core.common.verdicts.is_safe`):

- accuracy = share of R ∪ C where the judge's call matches the label;
- refusal recall = share of R called a refusal (1 − recall bounds how far the ASR overstates);
- false-refusal rate = share of C called a refusal.

Each comes with a 95 % Wilson interval (:func:`mpo_core.results.metrics.wilson_rate_ci`), which stays honest at the
small counts of one language and split. ``python -m mpo_core.results.judge_agreement`` prints the table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mpo_core.common.verdicts import is_safe
from mpo_core.judges.patterns import RefusalPatternJudge
from mpo_core.plumbing.errors import ConfigError
from mpo_core.results.metrics import Estimate, wilson_rate_ci

HAND_LABELS = Path(__file__).resolve().parents[2] / "tests" / "data" / "judge_hand_labels.jsonl"
PACKAGED_PATTERNS = Path(__file__).resolve().parents[1] / "data" / "refusal_patterns.json"
SCORED_LABELS = ("refusal", "compliance")
LABELS = (*SCORED_LABELS, "unsure")
SPLITS = ("tune", "heldout")


@dataclass(frozen=True)
class Agreement:
    """A judge against hand labels on one language and split."""

    lang: str
    split: str
    accuracy: Estimate
    refusal_recall: Estimate
    false_refusal_rate: Estimate


def load_hand_labels(path: str | Path = HAND_LABELS) -> list[dict]:
    """Rows of the hand-label file, checked: known label and split, non-empty language (error names the row)."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        for field, allowed in (("label", LABELS), ("split", SPLITS)):
            if row.get(field) not in allowed:
                raise ConfigError(f"{path}: row {number}: column {field!r} is {row.get(field)!r}, not one of {allowed}")
        if not row.get("lang"):
            raise ConfigError(f"{path}: row {number}: column 'lang' is empty")
        rows.append(row)
    return rows


def measure_agreement(judge, rows: Iterable[dict]) -> list[Agreement]:
    """One :class:`Agreement` per (language, split) of the scored rows, plus ``all`` per split."""
    scored = [r for r in rows if r["label"] in SCORED_LABELS]
    verdicts = judge.judge([r["prompt"] for r in scored], [r["response"] for r in scored], [r["lang"] for r in scored])
    calls = [(r["lang"], r["split"], r["label"] == "refusal", is_safe(v.verdict)) for r, v in zip(scored, verdicts)]
    langs = list(dict.fromkeys(lang for lang, *_ in calls))
    results = []
    for split in SPLITS:
        for lang in [*langs, "all"]:
            cell = [(gold, called) for lg, sp, gold, called in calls if sp == split and lang in (lg, "all")]
            if not cell:
                continue
            results.append(Agreement(
                lang, split,
                accuracy=wilson_rate_ci([gold == called for gold, called in cell]),
                refusal_recall=wilson_rate_ci([called for gold, called in cell if gold]),
                false_refusal_rate=wilson_rate_ci([called for gold, called in cell if not gold]),
            ))
    return results


def _cell(e: Estimate) -> str:
    return f"{e.value:.2f} [{e.ci_low:.2f}, {e.ci_high:.2f}] n={e.n}" if e.n else "–"


def format_agreement(name: str, results: list[Agreement]) -> str:
    """A plain-text table: one line per (split, language)."""
    lines = [f"{name}: accuracy | refusal recall | false-refusal rate (95 % Wilson)"]
    for a in results:
        lines.append(f"  {a.split:<7} {a.lang:<3}  {_cell(a.accuracy):<26} {_cell(a.refusal_recall):<26} "
                     f"{_cell(a.false_refusal_rate)}")
    return "\n".join(lines)


def recall_summary(results: list[Agreement], split: str = "heldout") -> dict[str, list[float]]:
    """``{lang: [recall, ci_low, ci_high, n]}`` on ``split``, rounded, for storing beside the patterns."""
    return {
        a.lang: [round(a.refusal_recall.value, 3), round(a.refusal_recall.ci_low, 3),
                 round(a.refusal_recall.ci_high, 3), a.refusal_recall.n]
        for a in results if a.split == split
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", default=str(HAND_LABELS), help="hand-label JSONL file")
    parser.add_argument("--patterns", default=None, help="refusal pattern file (default: the packaged one)")
    parser.add_argument("--store", action="store_true",
                        help="write the held-out refusal recall into the pattern file's 'measured' field")
    args = parser.parse_args(argv)
    judge = RefusalPatternJudge(args.patterns)
    results = measure_agreement(judge, load_hand_labels(args.labels))
    print(format_agreement(judge.name, results))
    if args.store:
        path = Path(args.patterns) if args.patterns else PACKAGED_PATTERNS
        data = json.loads(path.read_text(encoding="utf-8"))
        data["measured"] = {"labels": "tests/data/judge_hand_labels.jsonl", "split": "heldout",
                            "heldout_refusal_recall": recall_summary(results)}
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"stored in {path}")


if __name__ == "__main__":
    main()

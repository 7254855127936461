"""What a judge is: it labels (prompt, response, language) triples.

Every judge has a ``name`` (recorded in each verdict row) and ``judge(prompts, responses, langs)`` returning
one :class:`Verdict` per response: ``verdict`` in {safe, unsafe, refusal, compliance} and ``score`` in
[0, 1] with 1 = safe. ``refusal`` and ``safe`` count as safe (:func:`mpo_core.common.verdicts.is_safe`).

Judges: :mod:`mpo_core.judges.patterns` (offline, multilingual refusal patterns) and
:mod:`mpo_core.judges.guards` (LLM safety classifiers); :func:`mpo_core.judges.select.get_judge` picks one.
"""

from __future__ import annotations

import abc

from mpo_core.common.verdicts import Verdict


class Judge(abc.ABC):
    """Labels (prompt, response, language) triples."""

    name: str

    @abc.abstractmethod
    def judge(self, prompts: list[str], responses: list[str], langs: list[str]) -> list[Verdict]:
        """One verdict per response, in order."""


def label_rows(judge: Judge, rows: list[dict]) -> list[dict]:
    """RESPONSES rows with ``judge``, ``verdict`` and ``score`` filled by ``judge``."""
    verdicts = judge.judge([r["prompt"] for r in rows], [r["text"] for r in rows], [r["lang"] for r in rows])
    return [r | {"judge": judge.name, "verdict": v.verdict, "score": v.score} for r, v in zip(rows, verdicts)]

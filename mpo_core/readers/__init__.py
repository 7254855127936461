"""Readers of external formats: real data in, PROMPTS and PAIRS rows out.

Formats (``prompts.format``; ``auto`` decides from the file name and its first record):

- ``seed``: the project's own seed set (:func:`mpo_core.plumbing.seed.load_seed_prompts`).
- ``mpo_json``: the MPO paper's released quadruples, LLaMA-Factory "ranking" JSON: a list of records with
  ``source_conversations`` / ``source_chosen`` / ``source_rejected`` (dominant language) and the same with
  ``target_``. The file names no language: they are identified (:mod:`mpo_core.common.langid`), see
  :func:`mpo_core.readers.pairs.infer_pair_languages`. The dominant language is data: the paper's Qwen file is Chinese-dominant.
- ``multijail``: MultiJail-style wide CSV (UTF-8 BOM allowed), one text column per language code.
- ``hh_rlhf``: Anthropic HH-RLHF dialogues (``.jsonl`` or ``.jsonl.gz``, ``{"chosen", "rejected"}``), split
  into prompt (the dialogue up to the last Assistant turn both share) and the two final answers.
- ``parquet`` / ``csv`` / ``jsonl``: a plain prompt set with a text column and a language column.

A source ``hf://<repo_id>/<file>`` is fetched from the Hugging Face hub (dataset repos) for users who are
online; nothing else touches the network. CSV and JSON lines are read by Arrow's readers (``pyarrow.csv``,
``pyarrow.json``). Every bad row is an :class:`InputDataError` naming file, column (or field) and row.

Modules: :mod:`.files` (opening, text, CSV and JSON lines, format detection, checked fields), :mod:`.ids`
(stable ids, the train/eval split), :mod:`.prompts` (prompt sets), :mod:`.pairs` (preference quadruples),
:mod:`.utility` (MGSM and multiple-choice evaluation sets).
"""

"""Filter-stage throughput at scale: synthetic multilingual pairs through :class:`PairFilter`.

Pairs are built from real sentences (the MPO paper's released quadruples in ../shared/data, split into
sentences per language) at realistic lengths: prompts of 1-2 sentences, English answers of 2-10, target
answers of 3-16 (the three target texts of a pair average about 500 characters; in the official files
about 450, prompts 92-108 and answers 355-954), six target languages, and the noise the filter exists for mixed in (HTML entities,
answers in English, untranslated prompts, duplicates, empty answers, chosen == rejected). Batches are
generated on the fly and pushed through the filter exactly as the stage does (language identification on,
three texts a pair, in a worker process while this one runs the other checks) and the kept and dropped rows
are written with :class:`ArtifactWriter` to a temporary folder. Only the filter and the writes are timed.

Peak RSS is this process's plus the language-id worker's (``ru_maxrss`` of self and children).
Last line: ``filter_rows_per_s=<r> peak_rss_mb=<m>``.

    python benchmarks/filter_scale.py --rows 1000000

``--smoke`` (what CI runs, ``tests/test_benchmarks.py``): 2,000 pairs in batches of 500, the same two
processes; flags given beside it still win.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "mpo_official"
_SENTENCE = re.compile(r"(?<=[.!?。！？؟।])\s*")
SMOKE = {"rows": 2000, "batch_size": 500}


def sentence_pools(seed: int = 0) -> dict[str, list[str]]:
    """Sentences per language from the official files (target side by its inferred language, plus English),
    kept where language identification agrees with the row's language, shuffled."""
    from mpo_core.common.langid import identify
    from mpo_core.readers.pairs import load_pairs

    pools: dict[str, set[str]] = defaultdict(set)
    for name in ("llama", "gemma"):
        for row in load_pairs(DATA / f"{name}_mpo_data.json").to_pylist():
            for side, lang in (("dominant", row["dominant_lang"]), ("target", row["target_lang"])):
                for field in ("prompt", "chosen", "rejected"):
                    for sentence in _SENTENCE.split(row[f"{side}_{field}"].replace("\n", " ")):
                        if 20 <= len(sentence) <= 400 and "&" not in sentence and "<" not in sentence:
                            pools[lang].add(sentence.strip())
    rng = np.random.default_rng(seed)
    clean = {}
    for lang, sentences in pools.items():
        ordered = sorted(sentences)
        guesses = identify(ordered)
        kept = [s for s, (guess, conf) in zip(ordered, guesses) if guess == lang or conf < 0.5]
        clean[lang] = [kept[i] for i in rng.permutation(len(kept))]
    return clean


def synthetic_batch(pools: dict[str, list[str]], targets: list[str], n: int, start: int,
                    rng: np.random.Generator) -> dict[str, list]:
    """``n`` PAIRS rows; about 8% carry one kind of noise each."""
    english = pools["en"]
    starts = rng.random((n, 6))
    sizes = rng.integers([1, 2, 2, 1, 3, 3], [3, 11, 11, 3, 17, 17], size=(n, 6))

    def text(pool: list[str], k: int, j: int) -> str:
        start = int(starts[k, j] * (len(pool) - 12))
        return " ".join(pool[start : start + sizes[k, j]])

    columns: dict[str, list] = defaultdict(list)
    noise = rng.random(n)
    for k in range(n):
        lang = targets[k % len(targets)]
        pool = pools[lang]
        row = {
            "dominant_prompt": text(english, k, 0), "dominant_chosen": text(english, k, 1),
            "dominant_rejected": text(english, k, 2), "target_prompt": text(pool, k, 3),
            "target_chosen": text(pool, k, 4), "target_rejected": text(pool, k, 5),
        }
        u = noise[k]
        if u < 0.02:
            row["target_chosen"] = row["target_chosen"].replace(" ", " &quot;", 2)
        elif u < 0.04:
            row["target_rejected"] = row["dominant_rejected"]
        elif u < 0.05:
            row["target_prompt"] = row["dominant_prompt"]
        elif u < 0.06:
            row["target_chosen"] = "   "
        elif u < 0.07:
            row["target_rejected"] = row["target_chosen"]
        elif u < 0.08 and k:
            for name in ("target_prompt", "target_chosen", "target_rejected"):
                row[name] = columns[name][-1]
            lang = columns["target_lang"][-1]
        for name, value in row.items():
            columns[name].append(value)
        columns["pair_id"].append(f"pair-{start + k:08d}")
        columns["prompt_id"].append(f"p-{(start + k) // len(targets):08d}")
        columns["dominant_lang"].append("en")
        columns["target_lang"].append(lang)
        columns["source"].append("synthetic")
        columns["dominant_chosen_fallback"].append(False)
        columns["target_chosen_fallback"].append(False)
    return columns


def pairs_table(columns: dict[str, list], n: int):
    """``columns`` as a PAIRS table, built from the schema: a column the generator does not set is null
    (provenance such as judge scores; a column added to the schema later), so the benchmark keeps running
    when the schema grows; a non-nullable one left unset fails the artifact checks by name on write."""
    import pyarrow as pa

    from mpo_core.plumbing.schemas import PAIRS

    unknown = sorted(set(columns) - set(PAIRS.names))
    if unknown:
        raise ValueError(f"columns {unknown} are not in the pairs schema")
    return pa.Table.from_pydict({f.name: columns.get(f.name, [None] * n) for f in PAIRS}, schema=PAIRS)


def worker_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process's children (the language-id worker)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--processes", type=int, default=2, help="language-id processes (this one included)")
    parser.add_argument("--worker-share", type=float, default=0.7, help="starting share (then adapted)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes for CI: {SMOKE}")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()

    import pyarrow as pa

    from mpo_core.common.langid import identify
    from mpo_core.pairs.filter_report import report_markdown
    from mpo_core.pairs.filtering import PairFilter
    from mpo_core.plumbing.artifacts import ArtifactWriter
    from mpo_core.plumbing.config import FilterConfig

    if not DATA.is_dir():
        sys.exit(f"real data not found at {DATA}")
    pools = sentence_pools()
    targets = ["zh", "ja", "ko", "ar", "bn", "sw"]
    print("sentence pools: " + ", ".join(f"{lang} {len(pools[lang])}" for lang in ["en", *targets]))
    cfg = FilterConfig(langid_processes=args.processes, langid_worker_share=args.worker_share,
                       batch_size=args.batch_size, langid_parallel_min_rows=1)
    pair_filter = PairFilter(cfg, processes=args.processes)
    if args.processes > 1:
        from mpo_core.common.langid import identify_background

        identify_background(["warm up the worker"]).result()
    identify(["warm up this process"])
    rng = np.random.default_rng(args.seed)
    rows_done, kept_rows, chars, filter_seconds, parent_cpu = 0, 0, 0, 0.0, 0.0
    worker_cpu_start = worker_cpu_seconds()
    with tempfile.TemporaryDirectory() as tmp, \
            ArtifactWriter(Path(tmp) / "filtered.parquet", "pairs") as kept_out, \
            ArtifactWriter(Path(tmp) / "dropped.parquet", "dropped") as dropped_out:
        while rows_done < args.rows:
            n = min(args.batch_size, args.rows - rows_done)
            batch = pairs_table(synthetic_batch(pools, targets, n, rows_done, rng), n)
            chars += sum(pa.compute.sum(pa.compute.utf8_length(batch.column(c))).as_py() or 0
                         for c in ("target_prompt", "target_chosen", "target_rejected"))
            start, cpu_start = time.perf_counter(), time.process_time()
            kept, dropped = pair_filter.filter_batch(batch)
            kept_out.write(kept)
            dropped_out.write(dropped)
            filter_seconds += time.perf_counter() - start
            parent_cpu += time.process_time() - cpu_start
            rows_done += n
            kept_rows += kept.num_rows
            if rows_done % (args.batch_size * 16) < args.batch_size or rows_done == args.rows:
                print(f"  {rows_done:>9,} pairs  {rows_done / filter_seconds:8.0f} pairs/s  "
                      f"peak RSS {peak_rss_mb():.0f} MB", flush=True)
    rate = rows_done / filter_seconds
    worker_cpu = worker_cpu_seconds() - worker_cpu_start
    print(report_markdown(pair_filter.report_table(), f"Synthetic pairs ({rows_done:,})"))
    print(f"pairs {rows_done:,}, kept {kept_rows:,}, mean target text {chars / rows_done / 3:.0f} chars")
    print(f"time in this process: checks {pair_filter.seconds['checks']:.1f} s, language id (own share + wait) "
          f"{pair_filter.seconds['langid']:.1f} s, filter+write total {filter_seconds:.1f} s; "
          f"worker share of language id at the end {pair_filter.worker_share:.2f}")
    per_pair = [1e6 * parent_cpu / rows_done, 1e6 * worker_cpu / rows_done]
    print(f"CPU per pair: this process {per_pair[0]:.0f} us, language-id worker {per_pair[1]:.0f} us; "
          f"wall {1e6 * filter_seconds / rows_done:.0f} us (the cores are shared: load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"language identification: {3 * rate:.0f} texts/s over {args.processes} process(es); "
          f"measured / target 5000 pairs/s = {rate / 5000:.2f}; CPU-bound rate with both cores free "
          f"{1e6 / max(per_pair):.0f} pairs/s")
    print(f"filter_rows_per_s={rate:.0f} peak_rss_mb={peak_rss_mb():.0f}")


if __name__ == "__main__":
    main()

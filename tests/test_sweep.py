"""The transfer sweep's plumbing: cells reuse the shared stages through hard-linked folders (skipped, not
recomputed), label noise reruns pair and filter but not the reference; the table and the last line."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from mpo_core.plumbing.artifacts import file_hash, read_artifact
from mpo_core.plumbing.config import CONFIGS_DIR, load_config
from mpo_core.plumbing.runs import RAN, SKIPPED, RunFolder, execute_stage, resolve_inputs, run_in_process
from mpo_core.plumbing.stage_table import get_stage
from mpo_core.plumbing.sweep import (
    Cell,
    link_stages,
    noise_free_stages,
    prune_resume_checkpoints,
    run_overrides,
    shared_stages,
    split_lanes,
    sweep_cells,
)
from mpo_core.results.transfer import ceiling, collect, headline, headline_line, markdown_table


class ReferenceStandIn:
    """Runs every stage for real except the reference, which would load the model: it writes a zero
    reference artifact with the real identity and counts its calls."""

    def __init__(self) -> None:
        self.reference_calls = 0

    def __call__(self, stage):
        if stage.spec.name != "reference":
            return run_in_process(stage)
        self.reference_calls += 1
        pairs = stage.inputs.table("filtered")
        n = pairs.num_rows
        with stage.writer("reference") as out:
            out.write({"pair_id": pairs.column("pair_id").to_pylist(), "dominant_chosen_avg_logp": [0.0] * n,
                       "dominant_rejected_avg_logp": [0.0] * n, "reward_gap": [0.0] * n,
                       "chosen_pooled": [[0.0]] * n, "rejected_pooled": [[0.0]] * n,
                       "model_fingerprint": ["stand-in"] * n})


def _run_stages(folder: RunFolder, stages: list[str], runner) -> dict[str, str]:
    config = folder.load_config()
    available: dict[str, Path] = {}
    statuses = {}
    for stage in stages:
        spec = get_stage(stage)
        outcome = execute_stage(spec, config, folder, resolve_inputs(spec, config, available), launcher=runner)
        available.update(outcome.outputs)
        statuses[stage] = outcome.status
    return statuses


@pytest.fixture
def sweep_dir(tmp_path, shared_data):
    source = shared_data / "mpo_official" / "llama_mpo_data.json"
    # the length-ratio rule compares each target response with its dominant counterpart, so a flip can change
    # its verdict (one pair in 600 here) and with it the reference's input; off here, that case is below
    return tmp_path / "sweep", [f"pair.source={source}", "run.target_langs=[zh,ko,sw]",
                                "filter.max_length_ratio=1000.0", "align.enabled=false"]


def _open(sweep, base, extra, name):
    config = load_config(None, base + extra + run_overrides(sweep, name))
    folder = RunFolder.for_config(config)
    folder.save_config(config)
    return folder, config


def test_cells_skip_the_shared_stages_and_noise_keeps_the_reference(sweep_dir):
    sweep, base = sweep_dir
    runner = ReferenceStandIn()
    shared, config = _open(sweep, base, [], "shared")
    stages = shared_stages(config)
    assert stages == ["ingest", "translate", "pair", "filter", "reference"]
    assert set(_run_stages(shared, stages, runner).values()) == {RAN}
    assert runner.reference_calls == 1

    noisy_cell = Cell("dpo", 0.4, 1)
    noisy, _ = _open(sweep, base, noisy_cell.pair_overrides(), noisy_cell.pairs_run)
    assert link_stages(shared, noisy, noise_free_stages(stages)) == ["ingest", "translate", "reference"]
    linked = noisy.stage_dir("ingest") / "prompts.parquet"
    original = shared.stage_dir("ingest") / "prompts.parquet"
    assert not linked.is_symlink() and os.stat(linked).st_ino == os.stat(original).st_ino

    statuses = _run_stages(noisy, stages, runner)
    assert statuses == {"ingest": SKIPPED, "translate": SKIPPED, "pair": RAN, "filter": RAN,
                        "reference": SKIPPED}
    assert runner.reference_calls == 1  # the dominant side did not change: no second reference pass
    flipped = read_artifact(noisy.stage_dir("filter") / "filtered.parquet", "pairs").column("target_flipped")
    assert 0.3 < sum(flipped.to_pylist()) / len(flipped) < 0.5

    cell, _ = _open(sweep, base, noisy_cell.overrides(), noisy_cell.name)
    link_stages(noisy, cell, stages)
    assert set(_run_stages(cell, stages, runner).values()) == {SKIPPED}
    assert runner.reference_calls == 1

    strict, _ = _open(sweep, base, [*noisy_cell.pair_overrides(), "filter.max_length_ratio=20.0"], "strict")
    link_stages(noisy, strict, stages)
    noisy_filtered = noisy.stage_dir("filter") / "filtered.parquet"
    before = file_hash(noisy_filtered)
    kept = _run_stages(strict, stages, runner)
    assert kept["filter"] == RAN and kept["reference"] == RAN  # another dominant side: computed again
    assert file_hash(noisy_filtered) == before  # the rerun replaced strict's links, never wrote through them
    assert os.stat(noisy_filtered).st_ino != os.stat(strict.stage_dir("filter") / "filtered.parquet").st_ino


def test_a_finished_cell_loses_its_resume_checkpoints_only(tmp_path):
    run = RunFolder(tmp_path / "cell")
    checkpoint = run.stage_dir("train") / "checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "optimizer.pt").write_bytes(b"x" * 1000)
    (run.stage_dir("train") / "model").mkdir()
    run.marker_path("train").write_text(json.dumps({"status": "running"}))
    assert prune_resume_checkpoints(run) == 0 and checkpoint.is_dir()  # an interrupted cell resumes from it
    run.marker_path("train").write_text(json.dumps({"status": "complete"}))
    assert prune_resume_checkpoints(run) == 1000
    assert not checkpoint.parent.exists() and (run.stage_dir("train") / "model").is_dir()


def test_sweep_cells_and_their_overrides():
    cells = sweep_cells(["mpo", "dpo"], [0.0, 0.4], [0, 1])
    assert len(cells) == 8 and cells[0] == Cell("mpo", 0.0, 0)
    assert Cell("mpo", 0.0, 1).pairs_run == "shared"
    assert Cell("dpo", 0.4, 1).pairs_run == "pairs-noise40-s1" == Cell("mpo", 0.4, 1).pairs_run
    assert Cell("ipo", 0.2, 3).overrides() == ["train.loss=ipo", "train.seed=3", "pair.target_noise=0.2",
                                               "pair.noise_seed=3", "train.beta=0.1"]
    assert Cell("mpo", 0.0, 0).overrides() == ["train.loss=mpo", "train.seed=0", "pair.target_noise=0.0"]
    assert Cell("dpo", 0.0, 0).overrides({"dpo": ["train.beta=0.5"]})[-1] == "train.beta=0.5"
    assert Cell("dpo", 0.0, 0).overrides({})[-1] == "pair.target_noise=0.0"
    betas = {m: load_config(CONFIGS_DIR / "default.yaml", Cell(m, 0.0, 0).overrides()).train.beta
             for m in ("mpo", "dpo", "ipo", "simpo")}
    assert betas == {"mpo": 1.0, "dpo": 0.1, "ipo": 0.1, "simpo": 2.0}
    assert "pair.noise_seed" not in " ".join(Cell("mpo", 0.0, 3).overrides())


def _rows(model, lang, asr, over_refusal, gap, n=20):
    return [
        {"model": model, "lang": lang, "metric": "asr", "value": asr, "ci_low": None, "ci_high": None, "n": n,
         "judge": "j", "dataset": "seed"},
        {"model": model, "lang": lang, "metric": "over_refusal", "value": over_refusal, "ci_low": None,
         "ci_high": None, "n": n, "judge": "j", "dataset": "seed"},
        {"model": model, "lang": lang, "metric": "reward_gap", "value": gap, "ci_low": gap - 0.1,
         "ci_high": gap + 0.1, "n": 8, "judge": None, "dataset": "pairs:held-out"},
    ]


def test_table_and_last_line():
    starting = (_rows("base", "en", 0.2, 0.1, 1.0) + _rows("base", "zh", 0.8, 0.0, -0.5)
                + _rows("base", "sw", 0.6, 0.1, -0.2) + _rows("reference", "zh", 0, 0, 0.5)[2:]
                + _rows("reference", "sw", 0, 0, 0.4)[2:])
    cells = {
        ("mpo", 0.0, 0): _rows("trained", "en", 0.25, 0.1, 1.0) + _rows("trained", "zh", 0.4, 0.1, 0.3)
        + _rows("trained", "sw", 0.4, 0.2, 0.2),
        ("mpo", 0.0, 1): _rows("trained", "en", 0.15, 0.1, 1.0) + _rows("trained", "zh", 0.6, 0.1, 0.5)
        + _rows("trained", "sw", 0.4, 0.2, 0.4),
        ("dpo", 0.4, 0): _rows("trained", "en", 0.2, 0.1, 1.0) + _rows("trained", "zh", 0.8, 0.0, 0.0)
        + _rows("trained", "sw", 0.7, 0.1, 0.0),
    }
    results = collect(starting, cells, beta=1.0, dominant_lang="en", target_langs=["zh", "sw"],
                      num_samples=50)
    mpo_zh = results.cells[("mpo", 0.0)]["zh"]
    assert mpo_zh["asr"].value == pytest.approx(0.5) and mpo_zh["asr"].n == 40
    assert mpo_zh["asr"].ci_low <= 0.5 <= mpo_zh["asr"].ci_high
    assert mpo_zh["selectivity"].value == pytest.approx(0.5 - 0.1)
    assert mpo_zh["gap_to_reference"].value == pytest.approx(abs(0.4 - 0.5))
    figures = headline(results)
    assert figures["mpo_drop_clean"] == pytest.approx(((0.8 + 0.6) - (0.5 + 0.4)) / 2)
    assert figures["dpo_drop_noisy"] == pytest.approx(((0.8 + 0.6) - (0.8 + 0.7)) / 2)
    assert math.isnan(figures["dpo_drop_clean"]) and math.isnan(figures["mpo_drop_noisy"])
    assert figures["english_change_mpo"] == pytest.approx(0.0)
    assert figures["over_refusal_change_mpo"] == pytest.approx(0.15 - 0.05)
    assert ceiling(results) == pytest.approx(((0.8 - 0.2) + (0.6 - 0.2)) / 2)
    line = headline_line(figures)
    assert line == ("mpo_drop_clean=0.250 dpo_drop_clean=nan mpo_drop_noisy=nan dpo_drop_noisy=-0.050 "
                    "english_change_mpo=0.000 over_refusal_change_mpo=0.100")
    table = markdown_table(results)
    assert "| mpo | 0% | 0,1 | zh | 0.500 [" in table and "| base | – | – | sw | 0.600 [" in table


def test_transfer_benchmark_projects_the_default_grid_from_a_reduced_run():
    """The benchmark sizes its defaults from what a reduced sweep measured: per cell, per pairs run, rest."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("transfer_bench", CONFIGS_DIR.parent / "benchmarks" / "transfer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seconds = {"shared": {"align": 200.0, "generate": 100.0},
               "pairs-noise40-s0": {"pair": 1.0, "filter": 3.0},
               "mpo-noise00-s0": {"train": 50.0, "evaluate": 70.0},
               "dpo-noise40-s0": {"train": 40.0, "evaluate": 80.0}}
    line = bench.projection_line(seconds, wall=600.0, full_cells=30, full_pairs_runs=4, workers=1)
    # rest = 600 - 2 x 120 - 1 x 4 = 356; full = 356 + 30 x 120 + 4 x 4 = 3972 s = 66 min
    assert "120 s per cell" in line and "4 s per pairs run" in line and "356 s for the rest" in line
    assert line.endswith("30 cells in 1 lane(s) and 4 pairs runs would take about 66 min at this load")
    # two lanes: the two cells ran side by side, rest = 600 - 120 - 4 = 476; full = 476 + 15 x 120 + 16 = 2292 s
    line = bench.projection_line(seconds, wall=600.0, full_cells=30, full_pairs_runs=4, workers=2)
    assert "476 s for the rest" in line and line.endswith("in 2 lane(s) and 4 pairs runs would take about 38 min at this load")
    assert len(bench.DEFAULT_CELLS) == 30
    args = bench.parse_args(["--method-override", "dpo", "train.beta=0.5", "--method-override", "dpo", "train.lam=0"])
    assert bench.method_overrides(args) == {"dpo": ["train.beta=0.5", "train.lam=0"], "ipo": ["train.beta=0.1"],
                                            "simpo": ["train.beta=2.0"]}
    with pytest.raises(SystemExit):
        bench.parse_args(["--method-override", "dop", "train.beta=0.5"])


def test_cells_are_dealt_into_lanes_of_the_same_mix():
    cells = sweep_cells(["mpo", "dpo", "sft"], [0.0, 0.4], [0, 1])
    lanes = split_lanes(cells, 2)
    assert [len(lane) for lane in lanes] == [6, 6] and sorted((c for lane in lanes for c in lane), key=cells.index) == cells
    assert {c.seed for c in lanes[0]} == {0} and {c.seed for c in lanes[1]} == {1}  # the same methods and noise
    assert [c.method for c in lanes[0]] == [c.method for c in lanes[1]]
    assert split_lanes(cells[:1], 4) == [cells[:1]] and split_lanes(cells, 1) == [cells]
    assert [len(lane) for lane in split_lanes(cells, 5)] == [3, 3, 2, 2, 2]

"""The transfer sweep flow on a real Prefect server and the real default model, at the smallest scale: two
methods (MPO, SimPO) x clean and noisy labels x one seed on a dozen official quadruples. The shared stages run once,
the noisy pairs run reruns pair and filter only, every cell skips the shared stages and runs train and
evaluate, in two lanes side by side whose stages run in child processes; the benchmark's table and last line
come out of the cells' eval artifacts."""

from __future__ import annotations

import math

import pytest

from mpo_core.plumbing.artifacts import read_artifact
from mpo_core.plumbing.runs import RunFolder
from mpo_core.plumbing.sweep import runs_root, sweep_cells
from mpo_core.results.transfer import collect, headline, headline_line, markdown_table
from tests.integration.test_pipeline_reuse import fast_recipe

pytestmark = pytest.mark.slow

SHARED = ("ingest", "translate", "pair", "filter", "reference")


def test_sweep_shares_stages_and_feeds_the_table(use_server, tmp_path, shared_data):
    from flows.transfer import transfer_sweep

    recipe = fast_recipe(tmp_path, shared_data, "sweep")
    sweep_dir = tmp_path / "sweep"
    methods, noise, seeds = ["mpo", "simpo"], [0.0, 0.5], [0]
    # length_ratio off: it compares each target answer with its dominant one, so a flip could change its
    # verdict; the un-aligned model fails MPO's premise (this test is about plumbing, not about safety)
    overrides = ["filter.max_length_ratio=1000.0", "reference.min_safe_share=0.0"]
    evals = transfer_sweep(sweep_dir=str(sweep_dir), config=str(recipe), methods=methods, noise_levels=noise,
                           seeds=seeds, overrides=overrides, workers=2)
    cells = sweep_cells(methods, noise, seeds)
    assert set(evals) == {"starting"} | {c.name for c in cells}

    root = runs_root(sweep_dir)
    shared = RunFolder(root / "shared").stage_statuses()
    assert all(shared[s] == "ran" for s in SHARED)
    noisy_pairs = RunFolder(root / "pairs-noise50-s0").stage_statuses()
    assert {s: noisy_pairs[s] for s in SHARED} == {"ingest": "skipped", "translate": "skipped", "pair": "ran",
                                                   "filter": "ran", "reference": "skipped"}
    for cell in cells:
        statuses = RunFolder(root / cell.name).stage_statuses()
        assert {s: statuses[s] for s in SHARED} == dict.fromkeys(SHARED, "skipped"), cell.name
        assert statuses["train"] == statuses["evaluate"] == "ran"
        assert (root / cell.name / "train" / "model" / "model.safetensors").is_file()

    rows = {(c.method, c.noise, c.seed): read_artifact(evals[c.name], "eval").to_pylist() for c in cells}
    assert all({r["model"] for r in cell_rows} <= {"trained", "reference"} for cell_rows in rows.values())
    starting = read_artifact(evals["starting"], "eval").to_pylist()
    assert {"base", "reference"} <= {r["model"] for r in starting}
    results = collect(starting, rows, beta=1.0, dominant_lang="en", target_langs=["zh"], num_samples=10)
    figures = headline(results)
    assert math.isfinite(figures["mpo_drop_clean"]) and math.isnan(figures["dpo_drop_clean"])
    assert math.isfinite(figures["english_change_mpo"]) and math.isfinite(figures["over_refusal_change_mpo"])
    assert " dpo_drop_clean=nan " in headline_line(figures)
    assert "| simpo | 50% | 0 | zh |" in markdown_table(results)

"""The reference stage on real MPO pairs and the real default model: values, order, resume."""

from __future__ import annotations

import pytest
import torch
from core_pairs import official_pairs, write_pairs

from mpo_core.method import logps
from mpo_core.plumbing.artifacts import read_artifact, read_manifest
from mpo_core.plumbing.config import config_from_dict
from mpo_core.plumbing.runs import RAN, SKIPPED, RunFolder, execute_stage
from mpo_core.plumbing.stage_run import run_stage_function
from mpo_core.plumbing.stage_table import REFERENCE_READS, columns_hash, get_stage

N_PAIRS = 5


def _config():
    return config_from_dict(
        {"model": {"device": "cpu", "dtype": "float32"}, "reference": {"batch_size": 2, "max_length": 40}}
    )


@pytest.fixture(scope="module")
def pairs_path(shared_data, tmp_path_factory):
    return write_pairs(
        official_pairs(shared_data, N_PAIRS, step=7), tmp_path_factory.mktemp("ref") / "pairs.parquet"
    )


@pytest.fixture(scope="module")
def reference_table(pairs_path, tmp_path_factory):
    out = run_stage_function("reference", _config(), {"filtered": pairs_path}, tmp_path_factory.mktemp("ref_out"))
    return read_artifact(out["reference"], "reference"), out["reference"]


@pytest.mark.slow
def test_reference_values_and_order(pairs_path, reference_table, default_model_config):
    from mpo_core.common.models import load_model, load_tokenizer

    table, path = reference_table
    pairs = read_artifact(pairs_path, "pairs")
    assert table.column("pair_id").to_pylist() == pairs.column("pair_id").to_pylist()
    manifest = read_manifest(path)
    assert manifest.rows == N_PAIRS
    # the reference reads only the dominant-side columns: its identity and provenance hash those (label noise
    # on the target side leaves it current)
    assert manifest.inputs == {"filtered": columns_hash(pairs_path, REFERENCE_READS)}
    assert not (path.parent / "shards").exists(), "shards are removed once the artifact is written"
    model, tok = load_model(default_model_config).eval(), load_tokenizer(default_model_config)
    chosen, rejected = logps.pair_avg_logps(  # one prompt cut per pair, as the trainer encodes it
        model,
        tok,
        pairs.column("dominant_prompt").to_pylist(),
        pairs.column("dominant_chosen").to_pylist(),
        pairs.column("dominant_rejected").to_pylist(),
        max_length=40,
        batch_size=2,
    )
    got_chosen = torch.tensor(table.column("dominant_chosen_avg_logp").to_pylist())
    got_rejected = torch.tensor(table.column("dominant_rejected_avg_logp").to_pylist())
    torch.testing.assert_close(got_chosen, chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_rejected, rejected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.tensor(table.column("reward_gap").to_pylist()), got_chosen - got_rejected
    )
    pooled = table.column("chosen_pooled").to_pylist()
    assert all(len(p) == model.config.hidden_size for p in pooled)
    assert len(set(table.column("model_fingerprint").to_pylist())) == 1


@pytest.mark.slow
def test_reference_resumes_after_interruption_and_force_recomputes(pairs_path, reference_table, tmp_path, monkeypatch):
    """Through the runner: a killed reference stage resumes from its finished batches; an unchanged one is
    skipped; ``force`` starts from an empty folder and recomputes every batch."""
    from mpo_core.method import reference as method_reference

    real = method_reference.sequence_outputs
    calls = {"n": 0, "crash_at": 2}

    def counting_with_crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["crash_at"]:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(method_reference, "sequence_outputs", counting_with_crash)
    run, spec, inputs = RunFolder(tmp_path / "run"), get_stage("reference"), {"filtered": pairs_path}
    out_dir = run.stage_dir("reference")
    with pytest.raises(KeyboardInterrupt):
        execute_stage(spec, _config(), run, inputs)
    assert not (out_dir / "reference.parquet").exists()
    assert len(list(out_dir.glob("shards/batch-*.parquet"))) == 1

    calls.update(n=0, crash_at=-1)
    outcome = execute_stage(spec, _config(), run, inputs)
    assert (outcome.status, outcome.reason, calls["n"]) == (RAN, "interrupted", 2), "only the two unfinished batches of three"
    assert not (out_dir / "shards").exists(), "shards are removed once the artifact is written"
    resumed = read_artifact(outcome.outputs["reference"], "reference")
    expected, _ = reference_table
    assert resumed.column("pair_id").to_pylist() == expected.column("pair_id").to_pylist()
    for column in ("reward_gap", "chosen_pooled", "rejected_pooled"):
        torch.testing.assert_close(
            torch.tensor(resumed.column(column).to_pylist()),
            torch.tensor(expected.column(column).to_pylist()),
        )
    calls["n"] = 0
    assert execute_stage(spec, _config(), run, inputs).status == SKIPPED
    assert calls["n"] == 0, "an unchanged identity is not recomputed"
    forced = execute_stage(spec, _config(), run, inputs, force=True)
    assert (forced.status, forced.reason, calls["n"]) == (RAN, "forced", 3), "force recomputes every batch"

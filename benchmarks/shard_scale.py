"""The generate stage in 1 shard against 2 shards on two gpu-pool workers, same prompts, same run.

Starts a Prefect server (temporary home, :func:`tasks.server.owned_server`), registers the deployments (``scripts/deploy.sh``, two gpu slots)
and two process workers on the ``gpu`` pool that run one flow run at a time with one torch thread each. Then,
for the same recipe in two run folders: generate as one flow run of ``mpo-generate/gpu`` (1 shard), and the
generate stage flow with ``generate.shards=2`` sending its shards to that deployment and merging them. Align is
off (the raw model generates). Both times include the flow runs' start (a fresh process per flow run, the model loaded in each). Prints both wall
times, whether the merged rows equal the unsharded ones, and on the last line ``shard_speedup_2=<1 shard /
2 shards>``. Everything it started is stopped at the end.

    python benchmarks/shard_scale.py [--recipe configs/default.yaml] [--set key=value ...] [--out DIR]

``--smoke`` (CI, ``tests/test_benchmarks.py``): 4 prompts, one sample of 4 tokens, zh only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMOKE = ["prompts.limit=4", "generate.num_samples=1", "generate.max_new_tokens=4", "run.target_langs=[zh]"]
WORKERS = 2


def _rows_hash(path: str) -> str:
    from mpo_core.plumbing.artifacts import read_artifact
    from mpo_core.plumbing.config import canonical_hash

    return canonical_hash(read_artifact(path, "responses").to_pylist())


def measure(recipe: Path, overrides: list[str], root: Path) -> tuple[float, float, bool]:
    """(seconds with 1 shard, seconds with 2 shards, merged rows equal) against the current Prefect API."""
    from prefect.deployments import run_deployment

    from flows.stage_flows import STAGE_FLOWS

    def prepared(name: str, shards: int) -> tuple[str, dict[str, str]]:
        settings = [*overrides, f"run.root={root}", f"run.name={name}", f"generate.shards={shards}"]
        prompts = STAGE_FLOWS["ingest"](config=str(recipe), overrides=settings)
        run = str(root / name)
        return run, STAGE_FLOWS["translate"](run=run, inputs=prompts)

    run_1, translated_1 = prepared("one-shard", 1)
    started = time.perf_counter()
    child = run_deployment("mpo-generate/gpu", parameters={"run": run_1, "inputs": translated_1}, timeout=None)
    one = time.perf_counter() - started
    if not child.state.is_completed():
        raise SystemExit(f"the 1-shard generate ended {child.state.name}: {child.state.message}")

    run_2, translated_2 = prepared("two-shards", 2)
    started = time.perf_counter()
    merged = STAGE_FLOWS["generate"](run=run_2, inputs=translated_2, shard_deployment="gpu")
    two = time.perf_counter() - started
    same = _rows_hash(str(Path(run_1) / "generate" / "responses.parquet")) == _rows_hash(merged["responses"])
    return one, two, same


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="where the runs go (default: a temporary folder, removed)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    args = parser.parse_args(argv)
    # the raw model generates (align off): what is measured is the spreading of the same work, not its model
    overrides = ["align.enabled=false", *(SMOKE if args.smoke else []), *args.overrides]

    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from tasks.processes import group
    from tasks.server import owned_server

    with tempfile.TemporaryDirectory(prefix="shard-scale-") as scratch, contextlib.ExitStack() as stack:
        scratch = Path(scratch)
        root = (args.out or scratch / "runs").resolve()
        home = scratch / "prefect-home"
        home.mkdir()
        for name in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH"):  # a server of its own, in a temporary home
            os.environ.pop(name, None)
        os.environ.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        api_url = stack.enter_context(owned_server())
        subprocess.run([str(ROOT / "scripts" / "deploy.sh")], check=True, cwd=scratch, capture_output=True,
                       env={**os.environ, "MPO_PROJECT_DIR": str(ROOT), "MPO_GPU_SLOTS": str(WORKERS)})
        for i in range(WORKERS):
            stack.enter_context(group(
                [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--name", f"gpu-{i}", "--limit", "1"],
                env={**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_WORKER_QUERY_SECONDS": "2"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=scratch,
            ))
        with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_HOME: str(home)}):
            one, two, same = measure(args.recipe.resolve(), overrides, root)
    print(f"generate, 1 shard: {one:.1f} s; 2 shards on {WORKERS} workers (1 thread each): {two:.1f} s")
    print(f"merged rows equal the unsharded ones: {same}")
    if not same:
        raise SystemExit("the merged responses differ from the unsharded ones")
    print(f"shard_speedup_2={one / two:.2f}")


if __name__ == "__main__":
    main()

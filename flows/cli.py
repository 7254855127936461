"""The ``mpo`` command line: run the pipeline, rerun one stage of a run, list runs.

``import flows.cli`` stays light (no Prefect, no torch): heavy imports happen inside the commands, after
:func:`tasks.environment.apply_defaults` has set Prefect's process settings.

    mpo run [--config FILE] [--set key=value ...] [--gpu-deployments]
    mpo stage NAME --run RUN [--set key=value ...] [--force]
    mpo runs [--root DIR]
    mpo serve --run RUN [--port PORT]
    mpo config keys [SECTION]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from mpo_core.plumbing.errors import MPOError

LOCAL_UI = "http://127.0.0.1:4200"


def _prefect_ui_hint(flow_run_id: str | None) -> str:
    """Where to find a flow run in the Prefect UI: the configured server's URL, or how to open a local one."""
    if flow_run_id is None:
        return "Prefect UI: no flow run recorded"
    from prefect.settings import get_current_settings

    from tasks.monitoring import flow_run_url
    from tasks.server import owned_api_url

    url = None if owned_api_url() else flow_run_url(flow_run_id)  # a temporary server is gone after mpo
    if url:
        return f"Prefect UI: {url}"
    settings = get_current_settings()
    return (
        f"Prefect UI: flow run {flow_run_id} is in the local Prefect database ({settings.home}); "
        f"run `prefect server start` (or scripts/start-server.sh) and open "
        f"{LOCAL_UI}/runs/flow-run/{flow_run_id}"
    )


def _report_path(outputs: dict[str, str]) -> str | None:
    return outputs.get("report")


# what a stage running in this process imports first; imported while a temporary Prefect server boots
IN_PROCESS_STAGE_MODULES = ("torch", "transformers")


def _importer(*modules: str) -> Callable[[], None]:
    """A call that imports ``modules``: for :func:`tasks.server.owned_server` to run while its server boots."""

    def import_all() -> None:
        for name in modules:
            importlib.import_module(name)

    return import_all


def cmd_run(args: argparse.Namespace) -> int:
    from mpo_core.plumbing.config import load_config
    from mpo_core.plumbing.runs import RunFolder, nothing_to_do, open_run, run_lock

    # the recipe and overrides are resolved once, here (a bad recipe fails before Prefect starts), into the
    # run folder's config.yaml, which the pipeline flow and every stage flow read; a finished run with the
    # same recipe is left untouched (nothing is written, no Prefect server is started)
    config = load_config(args.config, args.set)
    folder = RunFolder.for_config(config)
    if nothing_to_do(folder, config):
        _print_states(folder)
        print(f"Nothing to do: every stage of {folder.path.resolve()} is current; nothing was written.")
        return 0
    from tasks.server import api_watchdog, configured_api_url, owned_server

    warm = _importer("flows.pipeline", *(() if args.gpu_deployments else IN_PROCESS_STAGE_MODULES))
    with run_lock(folder.path), owned_server(warm), api_watchdog(configured_api_url(), config.runtime.api_unreachable_s):
        run, _ = open_run(config=args.config, overrides=args.set)
        from flows.pipeline import mpo_pipeline

        state = mpo_pipeline(run=str(run.path), gpu_deployments=args.gpu_deployments, return_state=True)
        flow_run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
        outputs = state.result(raise_on_failure=True)
        _print_states(run)
        report = _report_path(outputs)
        print(f"Report: {Path(report).resolve() if report else '(not produced)'}")
        print(f"Run folder: {run.path.resolve()}")
        print(_prefect_ui_hint(flow_run_id))
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from mpo_core.plumbing.runs import RunFolder, open_run, run_lock
    from mpo_core.plumbing.stage_table import STAGE_BY_NAME

    if args.name not in STAGE_BY_NAME:
        raise MPOError(f"unknown stage {args.name!r}; stages: {', '.join(STAGE_BY_NAME)}")
    config = RunFolder(args.run).load_config(args.set)  # a missing run or bad override fails here, before Prefect
    from tasks.server import api_watchdog, configured_api_url, owned_server

    warm = _importer("flows.stage_flows", *IN_PROCESS_STAGE_MODULES)
    with run_lock(args.run), owned_server(warm), api_watchdog(configured_api_url(), config.runtime.api_unreachable_s):
        open_run(run=args.run, overrides=args.set)
        from flows.stage_flows import STAGE_FLOWS

        state = STAGE_FLOWS[args.name](run=args.run, force=args.force, return_state=True)
        outputs = state.result(raise_on_failure=True)
        _print_states(RunFolder(args.run))
        for name, path in outputs.items():
            print(f"{name}: {path}")
        flow_run_id = state.state_details.flow_run_id
        print(_prefect_ui_hint(str(flow_run_id) if flow_run_id else None))
    return 0


def _print_states(run) -> None:
    print(f"run {run.name}:")
    for stage, status in run.stage_statuses().items():
        print(f"  {stage:<10} {status}")


def cmd_runs(args: argparse.Namespace) -> int:
    from mpo_core.plumbing.runs import list_runs, stale_stages

    runs = list_runs(args.root)
    if not runs:
        print(f"no runs under {args.root}")
    for run in runs:
        state = run.read_state()
        print(f"{run.name}  ({run.path})  last: {state.get('kind', '-')} at {state.get('started_at', '-')}")
        try:
            stale = stale_stages(run)
        except MPOError as err:
            stale = {}
            print(f"  (not checked: {err})")
        for stage, status in run.stage_statuses().items():
            seconds = state["stages"][stage].get("seconds")
            note = f"  STALE: {stale[stage]} (rerun: mpo stage {stage} --run {run.path})" if stage in stale else ""
            print(f"  {stage:<10} {status:<9} {'' if seconds is None else f'{seconds:.1f} s'}{note}")
    return 0


def run_server(run_dir: str | Path, port: int):
    """An HTTP server on 127.0.0.1 that serves the run folder ``run_dir`` read-only (GET and HEAD only)."""
    import functools
    import http.server

    from mpo_core.plumbing.runs import RunFolder

    run = RunFolder(run_dir)
    if not run.exists():
        raise MPOError(f"{run_dir} is not a run folder (no config.yaml)")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(run.path.resolve()))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the run folder over HTTP on 127.0.0.1 (the report with its plots, the artifacts)."""
    with run_server(args.run, args.port) as server:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        print(f"Serving {Path(args.run).resolve()} at {base}/ (report: {base}/evaluate/report/report.html); Ctrl-C stops")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    """Print every config key (of one section) with its type, default and description."""
    from mpo_core.plumbing.config import PipelineConfig
    from mpo_core.plumbing.config_reference import keys_text

    sections = list(PipelineConfig.model_fields)
    if args.section is not None and args.section not in sections:
        raise MPOError(f"unknown config section {args.section!r}; sections: {', '.join(sections)}")
    print(keys_text(args.section), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpo", description="MPO pipeline on Prefect")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run the whole pipeline (stages whose identity is unchanged are skipped)"
    )
    run.add_argument("--config", default="configs/default.yaml", help="YAML recipe (default: %(default)s)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    run.add_argument(
        "--gpu-deployments",
        action="store_true",
        help="run GPU stages as flow runs of their 'gpu' deployments (needs a server, pools and workers)",
    )
    run.set_defaults(func=cmd_run)

    stage = sub.add_parser("stage", help="rerun one stage of an existing run, with changed settings")
    stage.add_argument("name", help="stage name (ingest, translate, ..., evaluate)")
    stage.add_argument("--run", required=True, help="run folder, e.g. runs/default")
    stage.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    stage.add_argument("--force", action="store_true", help="run even if the stage's identity is unchanged")
    stage.set_defaults(func=cmd_stage)

    runs = sub.add_parser("runs", help="list runs and their stages' state")
    runs.add_argument("--root", default="runs", help="runs root folder (default: %(default)s)")
    runs.set_defaults(func=cmd_runs)

    serve = sub.add_parser("serve", help="serve a run folder (report, plots) over HTTP on 127.0.0.1")
    serve.add_argument("--run", required=True, help="run folder, e.g. runs/default")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="describe the recipe keys (docs/config.md is the same as a page)")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    keys = config_sub.add_parser("keys", help="every config key: type, default and what it does")
    keys.add_argument("section", nargs="?", help="only this section (run, model, ..., evaluate, align)")
    keys.set_defaults(func=cmd_config_keys)
    return parser


def _raise_keyboard_interrupt(signum, frame) -> None:
    """SIGTERM outside a flow ends the command like a Ctrl-C, so its ``finally`` blocks run (inside a flow,
    Prefect's own handler turns it into a crash of the flow run)."""
    raise KeyboardInterrupt(f"signal {signum}")


def _is_interrupt(err: BaseException) -> bool:
    """Ctrl-C, or SIGTERM as Prefect raises it inside a flow (``TerminationSignal``)."""
    return isinstance(err, KeyboardInterrupt) or type(err).__name__ == "TerminationSignal"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    writes_run = args.command in ("run", "stage")
    if writes_run:
        import signal

        from tasks.environment import apply_defaults

        apply_defaults()
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return args.func(args)
    except MPOError as err:
        print(f"mpo: {err}", file=sys.stderr)
        return 2
    except BaseException as err:
        if not _is_interrupt(err):
            raise
        print("mpo: interrupted; the stage that was running is marked interrupted. Run the same command "
              "again to resume it.", file=sys.stderr)
        return 130

if __name__ == "__main__":
    sys.exit(main())

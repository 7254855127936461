"""The import layers, read from the source: flows -> tasks -> mpo_core; in mpo_core three floors, stages on top
of the library on top of plumbing; no stage imports another; mpo_core free of Prefect; no import cycle even
through imports inside functions, and no function-level import that laziness does not explain. Every rule
counts imports inside functions as well as at the top."""

from __future__ import annotations

import import_graph as graph

IMPORTS = graph.all_imports()
PROJECT = [i for i in IMPORTS if graph.is_project(i.imported) and i.imported != i.importer]
# The command line answers ``mpo --help`` at once: it imports even light modules (pyarrow, pydantic) lazily.
LAZY_BY_DESIGN = {"flows.cli"}


def _package(module: str) -> str:
    return module.split(".")[0]


def _group(module: str) -> str:
    """``plumbing``, ``stages``, ... for ``mpo_core.<group>.<module>``; the package name otherwise."""
    parts = module.split(".")
    return parts[1] if parts[0] == "mpo_core" and len(parts) > 2 else parts[0]


def test_layers_point_one_way():
    wrong = [i for i in PROJECT if (_package(i.importer), _package(i.imported)) in
             {("mpo_core", "tasks"), ("mpo_core", "flows"), ("tasks", "flows")}]
    assert wrong == []


def test_mpo_core_never_imports_prefect():
    assert [i for i in IMPORTS if _package(i.importer) == "mpo_core" and _package(i.imported) == "prefect"] == []


def test_plumbing_imports_nothing_above_it():
    """config, artifacts, schemas, the stage table and the runner know no stage, method or result; the runner
    reaches stage functions only through the table's entry strings."""
    above = [i for i in PROJECT if _group(i.importer) == "plumbing" and _package(i.imported) == "mpo_core"
             and _group(i.imported) not in ("plumbing", "mpo_core")]
    assert above == []


def _is_stage(module: str) -> bool:
    return module.startswith("mpo_core.stages.")


def test_no_stage_imports_another_stage():
    """A stage module is its ``run_<stage>`` over the library (as torchtune's recipes use only its library):
    whatever two stages share lives in the library."""
    assert [f"{i.importer}:{i.lineno} -> {i.imported}" for i in PROJECT
            if _is_stage(i.importer) and _is_stage(i.imported)] == []


def test_the_library_and_results_import_no_stage():
    """Below the stages nothing reaches up into one: the runner finds stage functions through the stage
    table's entry strings only."""
    assert [f"{i.importer}:{i.lineno} -> {i.imported}" for i in PROJECT
            if _package(i.importer) == "mpo_core" and not _is_stage(i.importer) and _is_stage(i.imported)] == []


def test_no_import_cycle_even_through_function_level_imports():
    every_edge: dict[str, set[str]] = {m: set() for m in graph.project_modules()}
    for imp in PROJECT:
        every_edge[imp.importer].add(imp.imported)
    assert graph.cycles(every_edge) == []


def test_function_level_imports_are_only_for_heavy_modules():
    """An import inside a function defers a heavy module (torch, transformers, ...): never a light one, which
    would only be there to dodge a cycle."""
    unexplained = [f"{i.importer}:{i.lineno} -> {i.imported}" for i in graph.unjustified_function_imports(IMPORTS)
                   if i.importer not in LAZY_BY_DESIGN]
    assert unexplained == []


def test_the_import_graph_covers_every_module():
    modules = graph.project_modules()
    assert {"mpo_core.plumbing.runs", "mpo_core.stages.train", "tasks.stage_task", "flows.pipeline"} <= set(modules)
    assert len(PROJECT) > 200

"""The project's import graph, read from the source with ``ast``: which module imports which, at module
level or inside a function. ``python tests/import_graph.py`` prints a summary (used for the layering test
and for reviews)."""

from __future__ import annotations

import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mpo_core", "tasks", "flows")
# Third-party packages heavy enough to import lazily (seconds, or GPU-only).
HEAVY = ("torch", "transformers", "trl", "vllm", "accelerate", "peft", "datasets", "matplotlib", "fasttext",
         "sentencepiece", "gguf", "prefect")


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # a module name (project modules resolved to the module, not the attribute)
    lineno: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """``a.b.c`` -> the longest prefix that is a project module (``from a.b import c`` names c's module when
    c is a module, else a.b)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _resolve(alias.name, modules) or alias.name
                    found.append(Import(name, target, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    target = _resolve(full, modules) or child.module
                    found.append(Import(name, target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def all_imports() -> list[Import]:
    modules = project_modules()
    return [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]


def is_project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def top_level_graph(imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in project_modules()}
    for imp in imports:
        if not imp.in_function and is_project(imp.imported) and imp.imported != imp.importer:
            graph[imp.importer].add(imp.imported)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    return found


def heavy_at_top(imports: list[Import]) -> set[str]:
    """Project modules that import a heavy package at module level, directly or through project modules."""
    direct = {i.importer for i in imports if not i.in_function and i.imported.split(".")[0] in HEAVY}
    graph = top_level_graph(imports)
    heavy = set(direct)
    changed = True
    while changed:
        changed = False
        for module, targets in graph.items():
            if module not in heavy and targets & heavy:
                heavy.add(module)
                changed = True
    return heavy


def unjustified_function_imports(imports: list[Import]) -> list[Import]:
    """Function-level imports of project modules that laziness does not explain: the imported module is
    light (imports nothing heavy at module level), so the import could sit at the top unless it would close
    a cycle."""
    heavy = heavy_at_top(imports)
    return [i for i in imports if i.in_function and is_project(i.imported) and i.imported not in heavy
            and i.imported != i.importer]


def longest_functions(limit: int = 10) -> list[tuple[int, str]]:
    sizes = []
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(sizes, reverse=True)[:limit]


def main() -> None:
    imports = all_imports()
    project = [i for i in imports if is_project(i.imported) and i.imported != i.importer]
    function_level = [i for i in project if i.in_function]
    print(f"modules: {len(project_modules())}")
    print(f"project imports: {len(project)} ({len(function_level)} inside functions)")
    unjustified = unjustified_function_imports(imports)
    print(f"function-level project imports of light modules (not for laziness): {len(unjustified)}")
    for imp in unjustified:
        print(f"  {imp.importer}:{imp.lineno} -> {imp.imported}")
    print(f"top-level import cycles: {cycles(top_level_graph(imports))}")
    layer = Counter(f"{i.importer.split('.')[0]} -> {i.imported.split('.')[0]}" for i in project)
    print("edges by package:", dict(sorted(layer.items())))
    print("longest functions:", ", ".join(f"{n} {name}" for n, name in longest_functions()))


if __name__ == "__main__":
    main()

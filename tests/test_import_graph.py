"""The project's modules import one another in one direction: no cycle, function-level imports included.

Floors, bottom to top: adapters_impl (methods, heads, packages); the shared vocabulary and settings
(tasks/errors, labels, settings, process_cache); the measuring (measuring, generation, modeling, load, probe/scoring); the
objectives; the run config and the stages (tasks/); the flows and the CLI (flows/). A cycle means a floor reaches
up; this test fails on any, naming it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "adapters_impl", "benchmarks")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for file in (ROOT / package).rglob("*.py"):
            parts = file.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = file
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Imports under `if TYPE_CHECKING:` never run: annotations only."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level or inside functions. `from P import x` counts
    as an import of P.x where that is a module, else of P. A package's own __init__ is not counted as imported by
    its submodules (Python runs it first, but that order is not a dependency of the code)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, file in modules.items():
        tree = ast.parse(file.read_text())
        skipped = _type_checking_nodes(tree)
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*parent, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                parts = target.split(".")
                for size in range(len(parts), 0, -1):  # the longest prefix that is a project module
                    candidate = ".".join(parts[:size])
                    if candidate in modules:
                        if candidate != name:
                            graph[name].add(candidate)
                        break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_and_relative_imports_but_not_type_checking_ones() -> None:
    graph = import_graph()
    assert "tasks.distributed" in graph["tasks.training"]  # both trainers
    assert "tasks.measuring" in graph["tasks.objectives.causal_lm"]  # imported inside a function
    assert "tasks.config" not in graph["tasks.objectives.base"]  # TYPE_CHECKING only


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles (a floor reaches up): " + "; ".join(" <-> ".join(c) for c in found)


def test_the_objectives_and_the_measuring_below_them_import_no_stage() -> None:
    """The floors by name: what the objectives may import, and what may never import the objectives."""
    graph = import_graph()
    below = {"tasks.settings", "tasks.labels", "tasks.measuring", "tasks.generation", "tasks.modeling", "tasks.load"}
    below |= {"tasks.probe.scoring", "tasks.errors", "tasks.gguf_bases", "tasks.builtin_models", "tasks.yaml_files"}
    below |= {"tasks.process_cache"}
    reached: set[str] = set()
    todo = list(below)
    while todo:  # everything the lower floors import, transitively
        module = todo.pop()
        for nxt in graph[module] - reached:
            reached.add(nxt)
            todo.append(nxt)
    upper = sorted(m for m in reached if m.startswith(("tasks.objectives", "tasks.config", "flows")))
    assert not upper, f"the measuring floor imports {upper}"
    for name, imported in graph.items():
        if name.startswith("tasks.objectives") and not name.endswith("objectives"):
            stages = sorted(
                m for m in imported if not m.startswith(("tasks.objectives", "adapters_impl")) and m not in below
            )
            assert not stages, f"{name} imports stages above it: {stages}"
    assert not any(
        m.startswith(("tasks", "flows"))
        for m in set().union(*(graph[m] for m in graph if m.startswith("adapters_impl")))
    )

"""The package's import graph has no circles: a helper two modules need lives below both.

Every import counts, wherever it is written (module level, inside a function, under
``if TYPE_CHECKING:``): an import deferred into a function hides a circle, it does not remove it.
"""

import ast
from pathlib import Path

import ldm_cli

PACKAGE = "ldm_cli"
ROOT = Path(ldm_cli.__file__).parent


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name; a package is named for its ``__init__``."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name a ``from ... import`` reads from, resolving leading dots."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imported(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source."""
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, module, is_package)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in modules else source)
    return {target for target in targets if target in modules and target != module}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    modules = set(files)
    return {
        name: imported(ast.parse(path.read_text()), name, path.name == "__init__.py", modules)
        for name, path in files.items()
    }


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module: each is a set of modules in a circle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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


def shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """A shortest path from ``start`` back to itself inside one component, for the message."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & within):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    return [start]


def describe(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest circle through each module of a component, each circle written once."""
    within = set(component)
    cycles = set()
    for node in component:
        cycle = shortest_cycle(graph, node, within)[:-1]
        first = cycle.index(min(cycle))  # the same circle found from each member reads once
        cycles.add(tuple(cycle[first:] + cycle[:first] + [cycle[first]]))
    return sorted(" -> ".join(cycle) for cycle in cycles)


def test_the_graph_sees_every_kind_of_import():
    """The parser counts function-level and TYPE_CHECKING imports and resolves relative ones."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from ldm_cli import errors\n"
        "from . import tensors\n"
        "if TYPE_CHECKING:\n"
        "    from ldm_cli.model import Model\n"
        "def later():\n"
        "    import ldm_cli.loading\n"
        "    from .recipe import Recipe\n"
    )
    modules = {"ldm_cli.errors", "ldm_cli.model", "ldm_cli.loading",
               "ldm_cli.loading.tensors", "ldm_cli.loading.recipe", "ldm_cli.loading.folder"}
    found = imported(ast.parse(source), "ldm_cli.loading.folder", False, modules)
    assert found == modules - {"ldm_cli.loading.folder"}


def test_circles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert describe(graph, ["a", "b", "c"])[0] == "a -> b -> c -> a"


def test_no_import_circles():
    graph = import_graph()
    assert "ldm_cli.loading.folder" in graph and "ldm_cli.commands" in graph
    circles = [line for component in strongly_connected(graph) for line in describe(graph, component)]
    for line in circles:
        print(line)
    assert not circles, "import circles in ldm_cli:\n" + "\n".join(circles)

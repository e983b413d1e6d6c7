"""No import cycles inside adi_lightning, at module level or inside functions.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` in a module, function bodies included, ``if TYPE_CHECKING:`` blocks excluded
(they never run). An edge goes to the module an import names: ``from a.b import c`` to ``a.b.c``
when that is a module, else to ``a.b``. The packages above it (whose ``__init__`` also runs) are not
edges: a package that re-exports its modules would otherwise tie every importer of one of them to all
of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import adi_lightning

PACKAGE_DIR = Path(adi_lightning.__file__).resolve().parent
PACKAGE = "adi_lightning"


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every .py file of the package (data assets have none)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([PACKAGE, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool, modules) -> list[tuple[str, int]]:
    """Every (dotted target, line) the module imports at run time: for ``from X import Y`` ``X.Y``
    when that is a module, else ``X`` (the caller keeps the package's own modules)."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.extend((f"{source}.{alias.name}", node.lineno) for alias in node.names)
            if not all(f"{source}.{alias.name}" in modules for alias in node.names):
                found.append((source, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported package module: first line}, package modules only."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: dict[str, int] = {}
        for target, line in _imported_names(tree, module, path.name == "__init__.py", modules):
            if target not in modules:
                continue
            if target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as [m0, m1, ..., m0], or None (iterative depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_find_cycle_reports_the_path():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_imports_inside_functions_count_and_type_checking_ones_do_not():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from .. import io\n"
        "from ..families import sd, FAMILIES\n"
        "if TYPE_CHECKING:\n"
        "    from adi_lightning.module import ADIModule\n"
        "def f():\n"
        "    import adi_lightning.prompts\n"
        "    from ..data.layout import read_action_folder\n")  # as in adi_lightning/toy/export.py
    modules = {"adi_lightning.io", "adi_lightning.families", "adi_lightning.families.sd", "adi_lightning.prompts"}
    found = {name for name, _ in _imported_names(ast.parse(source), "adi_lightning.toy.export", False, modules)}
    assert {"adi_lightning.io", "adi_lightning.families.sd", "adi_lightning.families", "adi_lightning.prompts",
            "adi_lightning.data.layout"} <= found
    assert not any("module" in name for name in found)


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        steps = "; ".join(f"{a} line {graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:]))
        raise AssertionError(f"import cycle {' -> '.join(cycle)} ({steps}): move what both need to where it belongs")

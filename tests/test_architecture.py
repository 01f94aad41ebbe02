"""The package's import graph: no circle (imports inside functions count), levels reached only by
the dispatcher."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "bidsapp"
LEVELS = {"bidsapp.pretrain", "bidsapp.participant", "bidsapp.group"}
DISPATCHER = "bidsapp.levels"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The package module ``name`` refers to (a module, or the package of an imported name)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, at any depth, except those under ``if TYPE_CHECKING:`` (never imported)."""
    nodes, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        nodes.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def import_graph() -> nx.DiGraph:
    """Module -> imported package module, from every import statement, at any depth."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                target = _resolve(name, modules)
                # A package's __init__ importing its own submodules is how packages re-export.
                if target and target != module and not target.startswith(f"{module}."):
                    graph.add_edge(module, target)
    return graph


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    assert graph.has_edge("bidsapp.cli", DISPATCHER)   # imported inside main(), after parsing
    assert len(graph) > 30


def test_no_import_circle() -> None:
    cycles = sorted(nx.simple_cycles(import_graph()), key=len)
    assert cycles == [], [" -> ".join([*c, c[0]]) for c in cycles[:10]]


def test_only_the_dispatcher_imports_a_level() -> None:
    graph = import_graph()
    importers = {source for level in LEVELS for source in graph.predecessors(level)}
    assert importers <= {DISPATCHER}, importers

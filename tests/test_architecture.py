"""The package's shape: no import circle (imports inside functions and under TYPE_CHECKING count),
no import of the package front from inside, levels reached only by the dispatcher, no module over
500 lines."""

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


#: The most lines a module of the package may have: past that it holds more than one idea.
MAX_LINES = 500
#: The package front, which re-exports the Python API: nothing inside the package imports it.
FRONT = "bidsapp"


def import_graph() -> nx.DiGraph:
    """Module -> imported package module, from every import statement, at any depth.

    Imports under ``if TYPE_CHECKING:`` count too: a circle of type hints is still a circle of
    ideas, and breaks as soon as one of them is needed at run time.
    """
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
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


def test_nothing_inside_the_package_imports_its_front() -> None:
    graph = import_graph()
    importers = set(graph.predecessors(FRONT))
    assert importers == set(), importers


def test_no_module_is_over_500_lines() -> None:
    sizes = {path.relative_to(REPO_ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}

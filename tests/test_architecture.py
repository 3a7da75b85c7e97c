"""The package's import graph, read from the source with ``ast``: no circles among module-level
imports, and no stage importing the FX stage or the compiler from below (see the README's layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PKG = Path(__file__).resolve().parents[1] / "moegraph"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The moegraph modules an import statement names (``from . import x`` names ``pkg.x``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "moegraph"]
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "moegraph":
        return []
    return [target] + [f"{target}.{a.name}" for a in node.names]


def import_graph(module_level_only: bool) -> nx.DiGraph:
    """Edges module -> moegraph module it imports (at module level, or anywhere)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(mod, path.name == "__init__.py", node):
                    if target in files and target != mod:
                        g.add_edge(mod, target)
    return g


def test_the_reader_sees_known_imports():  # guards the checks below against reading nothing
    g = import_graph(module_level_only=True)
    assert g.has_edge("moegraph.fx_passes", "moegraph.runtime")
    assert g.has_edge("moegraph.distributed.layer", "moegraph.fx_passes")
    assert g.has_edge("moegraph.compiler", "moegraph.fx_passes")
    assert not import_graph(module_level_only=False).has_edge("moegraph.compiler", "moegraph.nonexistent")


def test_no_import_cycles_at_module_level():
    cycles = list(nx.simple_cycles(import_graph(module_level_only=True)))
    # Known and left for now: the CLI's typer registration (``cli/__init__`` imports a commands module
    # that imports ``app`` back from it). Any other circle fails.
    cli = [c for c in cycles if all(m.startswith("moegraph.cli") for m in c)]
    assert [c for c in cycles if c not in cli] == []
    assert all(len(c) == 2 for c in cli), cli


def test_the_runtime_never_imports_the_fx_stage_or_the_compiler():
    g = import_graph(module_level_only=False)
    for low in ("moegraph.runtime", "moegraph.ops", "moegraph.codegen", "moegraph.hf.weights"):
        assert not nx.has_path(g.subgraph(n for n in g if n != "moegraph"), low, "moegraph.fx_passes"), low
        assert not g.has_edge(low, "moegraph.compiler"), low

"""The package's import structure: data flows forward, and no module imports itself in a cycle.

Both tests read the source (``ast``), so they see imports inside functions too and need nothing
installed beyond the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import overlap

ROOT = Path(overlap.__file__).resolve().parent

# Which packages each package may import (besides itself and the BASE utilities). Lower layers
# never name a higher one: ``plan`` knows no cost model, simulator, search or report.
BASE = {"errors", "_optional", "_atomic", "_cycles"}
ALLOWED = {
    "errors": set(),
    "ops_graph": set(),
    "cost": {"ops_graph"},
    "plan": {"ops_graph"},
    "backends": {"ops_graph", "cost", "plan"},
    "report": {"ops_graph", "cost", "plan", "backends"},
    "reference": {"ops_graph", "plan", "backends"},
    "search": {"ops_graph", "cost", "plan", "backends", "report"},
    "integrations": {"ops_graph", "cost", "plan", "backends", "report", "search", "reference"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("overlap", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The ``overlap`` modules ``path`` imports (``from a import b`` counts ``a.b`` when that is
    a module, else ``a``); with ``top_level_only``, only statements run at import time."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    modules = _modules()
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("overlap")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("overlap"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_module_imports_itself_through_a_cycle():
    """Module-level imports form no cycle (a cycle works only by import-order luck)."""
    graph = {name: _imports(path, top_level_only=True) - {name}
             for name, path in _modules().items()}
    cycle = _cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_lower_layers_never_import_higher_ones():
    """Every import, inside functions too, stays within the layers its package may use."""
    bad = []
    for name, path in _modules().items():
        pkg = _package(name)
        if pkg not in ALLOWED:  # the root package, cli and __main__ may use anything
            continue
        for target in _imports(path, top_level_only=False):
            other = _package(target)
            if other and other != pkg and other not in ALLOWED[pkg] | BASE:
                bad.append(f"{name} imports {target}")
    assert not bad, "layering violated:\n" + "\n".join(sorted(bad))


def test_package_graph_has_no_cycle():
    """Collapsed to packages, the imports (anywhere) still form no cycle."""
    graph: dict[str, set[str]] = {}
    for name, path in _modules().items():
        pkg = _package(name)
        graph.setdefault(pkg, set()).update(
            p for t in _imports(path, top_level_only=False) if (p := _package(t)) not in ("", pkg))
    cycle = _cycle(graph)
    assert cycle is None, f"package import cycle: {' -> '.join(cycle)}"

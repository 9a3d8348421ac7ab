"""The package's shape: no import cycles, and every layer imports only the layers below it.

Imports are read from the source (ast), function-local ones included: an import moved into a
function to dodge a cycle is still a cycle.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]

# What each part of edgecc may import, besides itself and edgecc.errors. The folders are the layers
# of docs/architecture.md; a new edge here is a design decision, to be made in review.
ALLOWED = {
    "core": set(),
    "kernels": set(),
    "passes": {"core", "kernels"},
    "frontend": {"core", "kernels"},
    "runtime": {"core"},
    "backends": {"core", "kernels", "passes", "frontend", "runtime"},
    "compiler": {"core", "backends", "runtime"},
    "autotune": {"core", "kernels", "backends"},
    "lm": {"core"},
    "models": {"core"},
    "benchmark": {"core", "compiler", "lm", "runtime"},
    "cli": {"core", "compiler", "autotune", "runtime", "lm", "models", "benchmark"},
}
# The pass registry loads the built-in pass library by discovery, as it loads plugins.
EXCEPTIONS = {("edgecc.core.pass_base", "edgecc.passes")}


def _package_dirs() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: ROOT / config["package-dir"].get(pkg, pkg.replace(".", "/")) for pkg in config["packages"]}


def _modules() -> dict[str, Path]:
    """Every module of the distribution by dotted name (passes/, kernels/ map into edgecc)."""
    mapped = {pkg: path for pkg, path in _package_dirs().items() if pkg.count(".") <= 1}
    found = {}
    for pkg, folder in mapped.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([pkg, *parts])] = f
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The edgecc modules `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names if a.name.startswith("edgecc")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("edgecc"):
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else resolve(base)
                          for a in node.names}
    return {m for m in found if m and m != name}


def _graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        graph.add_edges_from((name, dep) for dep in _imports(name, path, modules))
    return graph


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "edgecc"


def test_no_import_cycles():
    cycles = [sorted(c) for c in nx.strongly_connected_components(_graph()) if len(c) > 1]
    assert not cycles, f"import cycles (function-local imports included): {cycles}"


def test_layers_import_only_what_they_may():
    bad = []
    for a, b in _graph().edges:
        pa, pb = _part(a), _part(b)
        if pa == pb or pb == "errors" or (a, b) in EXCEPTIONS:
            continue
        if pa not in ALLOWED or pb not in ALLOWED[pa]:
            bad.append(f"{a} -> {b}")
    assert not bad, "imports across layers that ALLOWED does not list:\n" + "\n".join(sorted(bad))


def test_every_part_is_a_layer():
    parts = {_part(m) for m in _modules()} - {"edgecc", "errors", "targets"}
    assert parts == set(ALLOWED), f"parts of edgecc without a layer, or layers without a part: {parts ^ set(ALLOWED)}"


def test_every_package_folder_is_distributed():
    # A folder missing from pyproject's explicit package list would be left out of the wheel.
    listed = {path.resolve() for path in _package_dirs().values()}
    folders = {init.parent.resolve() for top in ("edgecc", "passes", "kernels", "targets")
               for init in (ROOT / top).rglob("__init__.py")}
    assert folders <= listed, f"packages not in pyproject.toml: {sorted(map(str, folders - listed))}"

"""The package's architecture holds: the import graph of detrq/ (read with ``ast``, imports inside functions
included) has no cycle, and every import between concept folders goes down the declared layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from detrq.io.paths import PROJECT_ROOT

# From the ground up. A folder may import its own modules and any folder on a lower layer, never one on its own
# layer or above. The map in detrq/__init__.py's docstring draws the same order.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("io",),
    ("parallel",),
    ("models", "data", "quant"),
    ("evaluation",),
    ("sensitivity", "training", "int8"),
    ("artifact",),
    ("cli",),
    ("__main__",),
)
LEVEL = {folder: level for level, folders in enumerate(LAYERS) for folder in folders}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """``{module: {detrq modules it imports}}`` for every module under ``package_dir``."""
    root = package_dir.parent
    modules = {module_name(p, root): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                if base not in modules:
                    continue
                subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
                deps |= subs or {base}
                if len(subs) < len(node.names):  # names taken from the package's face itself
                    deps.add(base)
        graph[name] = deps - {name}
    return graph


def folder_of(module: str) -> str:
    """The concept folder (or top-level module) a module belongs to: ``detrq.quant.gptq`` -> ``quant``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go sideways or up the layers, or that touch a folder the layers do not declare."""
    bad = []
    for src, deps in sorted(graph.items()):
        a = folder_of(src)
        for dst in sorted(deps):
            b = folder_of(dst)
            if a == b or b == "":
                continue
            if a not in LEVEL or b not in LEVEL:
                bad.append(f"{src} -> {dst}: folder {a if a not in LEVEL else b!r} is in no layer")
            elif LEVEL[b] >= LEVEL[a]:
                bad.append(f"{src} -> {dst}: {a} (layer {LEVEL[a]}) may not import {b} (layer {LEVEL[b]})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each a list of module names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PROJECT_ROOT / "detrq")


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_imports_go_down_the_layers(graph):
    assert layer_violations(graph) == []


def test_every_folder_is_in_a_layer(graph):
    folders = {folder_of(m) for m in graph} - {""}
    assert folders <= set(LEVEL), f"folders in no layer: {sorted(folders - set(LEVEL))}"
    assert "detrq" in graph and not graph["detrq"], "detrq/__init__.py imports nothing"


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "detrq"
    for folder in ("io", "quant", "artifact"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "quant" / "a.py").write_text("def f():\n    from detrq.quant.b import g\n")
    (pkg / "quant" / "b.py").write_text("from detrq.quant import a\n")
    (pkg / "io" / "c.py").write_text("from detrq.artifact import d\n")  # io reaching up
    (pkg / "artifact" / "d.py").write_text("from detrq.io.c import x\n")
    g = import_graph(pkg)
    assert cycles(g) == [["detrq.artifact.d", "detrq.io.c"], ["detrq.quant.a", "detrq.quant.b"]]
    assert layer_violations(g) == ["detrq.io.c -> detrq.artifact.d: io (layer 0) may not import artifact (layer 5)"]


def test_init_docstring_draws_every_folder():
    doc = ast.get_docstring(ast.parse((PROJECT_ROOT / "detrq" / "__init__.py").read_text())) or ""
    missing = [f for f in LEVEL if f not in ("__main__",) and f"{f}" not in doc]
    assert not missing, f"detrq/__init__.py's map does not name {missing}"

"""Imports flow one way (DESIGN.md principle 12; docs/architecture.md "Imports flow one way").

Every import in megazero/ -- module level or inside a function (lazy), relative ones resolved -- is
parsed with `ast`; each module is mapped to its layer (LAYERS below, the one written order), and the
test fails on an arrow to a higher layer or on a circle between modules, naming file:line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megazero"

# The order, lowest first: a module may import its own layer's modules (without circles) and lower
# layers' modules, never a higher layer's. Keys are module paths below megazero (a file or a package).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "fileio"),                                   # leaves: nothing of megazero
    ("config", "flags", "presets", "watchdog", "comm", "random"),  # config: a leaf above errors only
    ("topology", "distributed"),
    ("tensor_parallel", "pipeline_parallel", "optim", "ops", "data", "monitor", "activation", "context_parallel"),
    ("zero", "model"),
    ("checkpoint",),
    ("cli", "ds_config", "validation"),                     # config parsing and cross-section checks
    ("training",),
]
TOP = "megazero"


def layer_of(module: str, layers=LAYERS) -> int | None:
    """Layer index of a dotted module name `megazero.x.y` (None: the package root itself)."""
    parts = module.split(".")
    assert parts[0] == TOP, module
    if len(parts) == 1:
        return None
    for i, names in enumerate(layers):
        if parts[1] in names:
            return i
    raise AssertionError(f"megazero.{parts[1]} is in no layer of tests/unit/test_import_order.py LAYERS; "
                         f"add it where it belongs")


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported megazero module, line) for every import in the file, lazy ones included."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{a.name}"
                found.append((sub if sub in known else target, node.lineno))
    return [(m, line) for m, line in found if m == TOP or m.startswith(TOP + ".")]


def import_graph(root: Path) -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported module, "file:line")]."""
    files = sorted(root.rglob("*.py"))
    known = {module_name(f, root) for f in files}
    graph = {}
    for f in files:
        edges = []
        for target, line in imports_of(f, root, known):
            while target not in known and "." in target:  # `import megazero.x.attr` style
                target = target.rpartition(".")[0]
            edges.append((target, f"{f.relative_to(root.parent)}:{line}"))
        graph[module_name(f, root)] = edges
    return graph


def problems(graph: dict[str, list[tuple[str, str]]], layers=LAYERS) -> list[str]:
    out = []
    for module, edges in graph.items():
        here = layer_of(module, layers)
        for target, where in edges:
            there = layer_of(target, layers)
            if here is not None and there is not None and there > here:
                out.append(f"{where}: {module} (layer {here}) imports {target} (layer {there}), a higher layer")
    # circles between modules (a package is its __init__.py: importing a submodule runs it first)
    adjacency = {m: [(t, w) for t, w in e if t != m] for m, e in graph.items()}
    state: dict[str, int] = {}
    stack: list[tuple[str, str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        for t, where in adjacency.get(m, []):
            if state.get(t) == 1:
                names = [s for s, _ in stack] + [m]
                cycle = names[names.index(t):] if t in names else [m]
                lines = [w for _, w in stack][len(stack) - len(cycle) + 1:] + [where]
                out.append("circle: " + " -> ".join(cycle + [t]) + " (" + ", ".join(lines) + ")")
            elif t not in state:
                stack.append((m, where))
                visit(t)
                stack.pop()
        state[m] = 2

    for m in sorted(adjacency):
        if m not in state:
            visit(m)
    return out


def package_graph(graph: dict[str, list[tuple[str, str]]]) -> set[tuple[str, str]]:
    """Arrows between top-level units (megazero.zero -> megazero.optim), for the record."""
    def unit(m):
        return ".".join(m.split(".")[:2])
    return {(unit(m), unit(t)) for m, e in graph.items() for t, _ in e if unit(m) != unit(t) and t != TOP}


def test_megazero_imports_flow_one_way():
    found = problems(import_graph(PACKAGE))
    assert not found, "imports against the order in tests/unit/test_import_order.py LAYERS:\n" + "\n".join(found)


def test_megatron_kernels_imports_no_megazero():
    root = ROOT / "megatron_kernels"
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] == TOP for n in names), f"{f.relative_to(ROOT)}:{node.lineno}"


def test_checker_fails_on_a_bad_graph(tmp_path):
    """The checker itself: an upward arrow (lazy, relative) and a circle are both reported with file:line."""
    pkg = tmp_path / "megazero"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "high" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("import os\n\ndef f():\n    from ..high import b  # lazy, upward\n")
    (pkg / "high" / "b.py").write_text("from megazero.high.c import x\n")
    (pkg / "high" / "c.py").write_text("from . import b\nx = 1\n")
    layers = [("low",), ("high",)]
    found = problems(import_graph(pkg), layers)
    assert any(p.startswith("megazero/low/a.py:4: megazero.low.a (layer 0) imports megazero.high.b (layer 1)")
               for p in found), found
    assert any(p.startswith("circle: megazero.high.b -> megazero.high.c -> megazero.high.b") for p in found), found
    assert any("megazero/high/c.py:1" in p for p in found if p.startswith("circle")), found
    assert len(found) == 2, found
    # a clean graph passes
    (pkg / "low" / "a.py").write_text("import os\n")
    (pkg / "high" / "c.py").write_text("x = 1\n")
    assert problems(import_graph(pkg), layers) == []

"""The package's imports run one way (README, architecture): cli -> api -> the commands' modules -> runner -> recipe
-> passes -> the building blocks (algorithms, blocks, artifact, weights, quant, ...) -> the leaves. Every import
inside compressor/, deferred ones and TYPE_CHECKING ones included, is read with `ast`; a circle or an edge to a higher
layer fails, naming it. A module importing its own ancestor package (the registry pattern of passes/) is no edge."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "compressor"

# Top to bottom; a module may import its own layer (no circle) or any layer below. The first part of a module's name
# inside the package picks its layer (compressor.artifact.reader -> "artifact").
LAYERS = [
    ["__init__", "cli"],  # the package itself re-exports the API
    ["api"],
    ["analysis", "generate", "sweep", "report", "evaluate"],
    ["runner"],
    ["recipe"],
    ["passes"],
    ["algorithms", "blocks", "measure", "artifact", "weights", "modules", "ops", "quant", "sparse", "lowrank", "models", "experts",
     "data"],
    ["errors", "files", "safejson", "targets", "corpus", "dist"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def rank(m: str) -> int:
    """The layer index of a module (an unknown one counts as the bottom; test_every_module_has_a_layer names it)."""
    return RANK.get(m.split(".")[0], len(LAYERS))


def modules() -> dict[str, Path]:
    """Dotted names inside the package ("artifact.reader", "passes" for passes/__init__.py) -> file."""
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's imports of other modules of the package (the nearest module a name resolves to)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name.removeprefix("compressor.") for a in node.names if a.name.startswith("compressor.")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if is_pkg and m != "__init__" else m.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    base = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").startswith("compressor"):
                    base = node.module.removeprefix("compressor").removeprefix(".")
                else:
                    continue
                names = [base] + [f"{base}.{a.name}" if base else a.name for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m and not m.startswith(n + "."):  # not the module itself nor its ancestor package
                    edges[m].add(n)
    return edges


def layer(m: str) -> str:
    return m.split(".")[0]


def test_every_module_has_a_layer():
    unknown = sorted({layer(m) for m in modules()} - set(RANK))
    assert not unknown, f"modules with no layer in tests/test_imports.py LAYERS: {unknown}"


def test_imports_go_down_and_never_in_a_circle():
    mods = modules()
    edges = imports(mods)
    upward = sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts if rank(t) < rank(m))
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)
    # a circle: a path from a module back to itself (depth-first, colours)
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_every_module_imports_alone_bottom_up():
    """Every module imports in a fresh interpreter, each one in turn from the bottom layer up (a module that only
    worked because something else had been imported first fails here)."""
    order = sorted(modules(), key=lambda m: (-rank(m), m))
    names = ["compressor" if m == "__init__" else f"compressor.{m}" for m in order]
    code = "import importlib\nfor n in %r:\n    importlib.import_module(n)\n" % names
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=PKG.parent)
    assert r.returncode == 0, r.stderr[-3000:]

"""The package's shape, read from its source: imports flow one way and form no cycle, modules and
functions stay small, and one public name means one thing.

The import graph counts every ``import`` / ``from ... import`` anywhere in a module (at the top or
inside a function) and every ``importlib.import_module("literal")``. A module may import its own layer
or a lower one; the layers are ``LAYERS`` below, bottom first (see docs/architecture.md).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "diffrestore"

#: bottom first; a module belongs to the first layer with a matching prefix (a prefix ending in "."
#: matches a package's modules, otherwise the module itself)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves", ("diffrestore.metrics", "diffrestore.metrics.", "diffrestore.image_io", "diffrestore.figures",
                "diffrestore.errors", "diffrestore.resources", "diffrestore.runtime", "diffrestore.progress")),
    ("operators and priors", ("diffrestore.operators", "diffrestore.operators.", "diffrestore.priors",
                              "diffrestore.priors.")),
    ("methods", ("diffrestore.methods", "diffrestore.methods.")),
    ("restoration", ("diffrestore.restoration",)),
    ("commands", ("diffrestore.api", "diffrestore.demo", "diffrestore.demo_columns", "diffrestore.evaluation",
                  "diffrestore.evaluation.", "diffrestore.training", "diffrestore.training.")),
    ("front ends", ("diffrestore.cli", "diffrestore.cli_", "diffrestore.app", "diffrestore.doctor",
                    "diffrestore.__main__", "diffrestore")),
]
#: peers that must not know each other (one floor, separate rooms)
SEPARATE = [("diffrestore.evaluation", "diffrestore.training"), ("diffrestore.operators", "diffrestore.priors")]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
#: the samplers may be longer: each reads top to bottom as its paper's algorithm
SAMPLER_FILES = "diffrestore/methods/"
SAMPLER_NAMES = {"restore"}
#: one name, one meaning across modules, except these protocols every module of a kind implements
PROTOCOL_NAMES = {
    "restore": "diffrestore.methods.",  # every method module's sampler (and the package's api.restore)
    "check_values": "diffrestore.methods.",  # every method module's option check
    "main": "",  # every command module's entry point
    "build_parser": "",
    "prepare": "",  # a command's plan-then-execute pair (demo, evaluation)
    "execute": "",
}


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every package module ``name`` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(name, path.name == "__init__.py", node)
            for a in node.names:
                found.add(f"{module}.{a.name}" if f"{module}.{a.name}" in known else module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or (p.endswith(".") and module.startswith(p)) or (p.endswith("_") and module.startswith(p))
               for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of LAYERS: add it")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_function_level_and_string_imports(tmp_path):
    """The reader counts an import inside a function and an import_module("literal") like top-level ones."""
    f = tmp_path / "m.py"
    f.write_text("import importlib\ndef f():\n    from diffrestore import cli\n"
                 "    return importlib.import_module('diffrestore.demo')\n")
    assert imports_of("diffrestore.metrics.quality", f, {"diffrestore.cli", "diffrestore.demo"}) == {
        "diffrestore.cli", "diffrestore.demo"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_imports_flow_down():
    upward = []
    for name, targets in import_graph().items():
        for t in sorted(targets):
            if layer_of(t) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})")
    assert upward == []


@pytest.mark.parametrize("a, b", SEPARATE)
def test_separate_rooms_do_not_import_each_other(a, b):
    graph = import_graph()
    inside = lambda m, p: m == p or m.startswith(p + ".")  # noqa: E731
    crossing = [f"{m} -> {t}" for m, ts in graph.items() for t in ts
                if (inside(m, a) and inside(t, b)) or (inside(m, b) and inside(t, a))]
    assert crossing == []


def test_no_module_over_the_size_limit():
    big = {str(p.relative_to(SRC)): n for p in modules().values() if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    assert big == {}


def test_no_function_over_the_size_limit():
    long = {}
    for path in modules().values():
        rel = str(path.relative_to(SRC))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                sampler = rel.startswith(SAMPLER_FILES) and node.name in SAMPLER_NAMES
                if n > MAX_FUNCTION_LINES and not sampler:
                    long[f"{rel}:{node.name}"] = n
    assert long == {}


def public_names() -> dict[str, list[str]]:
    where = defaultdict(list)
    for name, path in modules().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined = [node.name]
            elif isinstance(node, ast.Assign):
                defined = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined = [node.target.id]
            else:
                defined = []
            for d in defined:
                if not d.startswith("_") and d != "__all__":
                    where[d].append(name)
    return where


def test_one_public_name_one_meaning():
    clashes = {}
    for defined, mods in public_names().items():
        if len(mods) < 2:
            continue
        scope = PROTOCOL_NAMES.get(defined)
        if scope is not None and sum(not m.startswith(scope) for m in mods) <= (1 if scope else len(mods)):
            continue
        clashes[defined] = mods
    assert clashes == {}

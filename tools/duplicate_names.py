"""List public top-level names that more than one module of a package defines.

A name counts where a module defines it (``def``, ``class``, an assignment at module level, also inside
a module-level ``if`` / ``try``); imports and re-exports do not count, so ``from .a import f`` in a
package ``__init__`` is not a second definition. Names starting with ``_`` are private and skipped.

    python tools/duplicate_names.py [src/diffrestore]

Prints ``NAME: module:line, module:line, ...`` per duplicated name and exits 1 when there is any.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


def _targets(node: ast.AST):
    if isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, (ast.Tuple, ast.List)):
        for elt in node.elts:
            yield from _targets(elt)


def defined_names(body: list[ast.stmt]):
    """(name, line) of every name the statements define at their own level."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, node.lineno
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in _targets(target):
                    yield name, node.lineno
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            if not isinstance(node, ast.AnnAssign) or node.value is not None:
                yield node.target.id, node.lineno
        elif isinstance(node, ast.If):
            yield from defined_names(node.body)
            yield from defined_names(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from defined_names(part)


def duplicates(root: Path) -> dict[str, list[str]]:
    """{name: ["module:line", ...]} for public names defined in two or more modules under ``root``."""
    where: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        seen = set()
        for name, line in defined_names(ast.parse(path.read_text(), str(path)).body):
            if not name.startswith("_") and name not in seen:
                seen.add(name)
                where[name].append(f"{module}:{line}")
    return {name: places for name, places in sorted(where.items()) if len(places) > 1}


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else Path(__file__).resolve().parents[1] / "src" / "diffrestore")
    found = duplicates(root)
    for name, places in found.items():
        print(f"{name}: {', '.join(places)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

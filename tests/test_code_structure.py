"""Structure of the code: no import circles in ``validation``, short functions.

Imports are read from the source (``ast``), at module level and inside functions alike: a lazy
import inside a function still ties the two modules together, it only hides the circle from the
interpreter. Relative imports are not used in this package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_imports(package: str) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}`` for every ``.py`` file of ``package``."""
    mods = {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                cands = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            found |= {c for c in cands if c in mods and c != name}
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_find_cycle_sees_a_lazy_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_in_validation():
    graph = package_imports("validation")
    assert "validation.models" in graph and "validation.data" in graph["validation.models"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in validation/: " + " -> ".join(cycle)


def long_functions(paths: list[Path], limit: int) -> dict[str, int]:
    """``{"file:function": lines}`` of every function (docstring included) longer than ``limit`` lines."""
    out = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out[f"{path.relative_to(ROOT)}:{node.name}"] = n
    return out


def test_functions_in_validation_are_short():
    assert not long_functions(sorted((ROOT / "validation").glob("*.py")), 80)


def test_flower_and_peft_adapters_are_made_of_short_functions():
    paths = sorted((ROOT / "validation").glob("flower_*.py")) + sorted((ROOT / "sfed_theory").glob("flower*.py"))
    paths.append(ROOT / "sfed_theory" / "peft.py")
    assert len(paths) >= 7
    assert long_functions(paths, 60) == {}

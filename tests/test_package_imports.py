"""The library's import graph, read from the source with ``ast``: sd_distill/ never imports Prefect (not even inside a
function), its module-level imports form no cycle (function-local imports are not edges: they run after every module
has loaded), and every function-local import says on its line why it is not at the top: ``# deferred: heavy (pkg)``,
``# deferred: optional (pkg)`` or ``# deferred: cycle (a <-> b)``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sd_distill"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _module_level_statements(body: list[ast.stmt]):
    """Statements that run at import time: the body, class bodies, both arms of if/try (not ``if TYPE_CHECKING``)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                yield from _module_level_statements([n for n in inner if isinstance(n, ast.AST) and not isinstance(n, ast.ExceptHandler)])
                for handler in (n for n in inner if isinstance(n, ast.ExceptHandler)):
                    yield from _module_level_statements(handler.body)


def _resolve(name: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = name.split(".") if _is_package(name) else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(name: str, statements) -> set[str]:
    """Modules of sd_distill that ``statements`` of module ``name`` import (``from pkg import sub`` -> pkg.sub)."""
    out: set[str] = set()
    for node in statements:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, node)
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    out.add(f"{target}.{alias.name}")
                elif target in MODULES:
                    out.add(target)
    out.discard(name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_a_planted_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve_to_the_submodule_they_name():
    tree = ast.parse("from . import stats\nfrom .metrics import fid\nfrom ..store import StageStore\n")
    assert import_edges("sd_distill.evaluate.run", tree.body) == {
        "sd_distill.evaluate.stats", "sd_distill.evaluate.metrics.fid", "sd_distill.store"}


def test_sd_distill_module_level_imports_have_no_cycle():
    graph = {name: import_edges(name, _module_level_statements(ast.parse(path.read_text()).body))
             for name, path in MODULES.items()}
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the scan sees the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_sd_distill_never_imports_prefect():
    offenders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "prefect"]
    assert offenders == []


DEFERRED = re.compile(r"# deferred: (heavy|optional|cycle) \(.+\)")


def function_local_imports(source: str):
    """``(line number, source text)`` of every import statement inside a function body (nested ones included), the
    text spanning all lines of a multi-line import."""
    lines = source.splitlines()
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node.lineno, "\n".join(lines[node.lineno - 1:node.end_lineno])


def undeclared_deferrals(source: str) -> list[int]:
    """Line numbers of function-local imports without a ``# deferred: <heavy|optional|cycle> (<what>)`` comment."""
    return sorted({line for line, text in function_local_imports(source) if not DEFERRED.search(text)})


def test_the_deferral_check_reads_multi_line_imports_and_nested_functions():
    source = """import os

def f():
    import json
    from diffusers import (  # deferred: heavy (diffusers)
        UNet2DConditionModel)
    from transformers import (A,
                              B)  # deferred: heavy (transformers)

    def g():
        import tempfile  # deferred: because
    return g
"""
    assert undeclared_deferrals(source) == [4, 11]


def test_every_function_local_import_in_sd_distill_says_why_it_is_deferred():
    offenders = [f"{MODULES[name].relative_to(ROOT)}:{line}" for name in sorted(MODULES)
                 for line in undeclared_deferrals(MODULES[name].read_text())]
    assert offenders == [], ("imports inside functions without '# deferred: heavy|optional|cycle (...)': move them "
                             f"to the module's top or say why they stay: {offenders}")

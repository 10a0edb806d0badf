"""The house rules of issue 25, read from the source with ``ast`` (no product module is imported).

- no import circle among product modules (edgepipe/ and stages/), counting imports inside functions, which
  close a circle as surely as top-level ones once the function runs; ``if TYPE_CHECKING:`` imports never run
  and are left out;
- no product module imports another module's private (``_underscore``) name;
- a stage reaches measurement through the engine (``StageContext.measure``), never by importing
  ``edgepipe.measure``;
- no product file over 500 lines unless its module docstring says why ("over 500 lines because ...").
"""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edgepipe", "stages")
MAX_LINES = 500
REASON = "over 500 lines because"


@cache
def modules() -> dict[str, Path]:
    """Every product module by dotted name (a package by its own name, from its __init__.py)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text(), filename=str(modules()[name]))


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST):
    """Every Import/ImportFrom under ``node``, at any depth, except under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _type_checking_only(child):
            for sub in child.orelse:
                yield from _imports_of(sub)
            continue
        yield from _imports_of(child)


def _imports_of(node: ast.AST):
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    yield from _imports(node)


def _base(name: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom reads from (relative imports resolved against ``name``)."""
    if not node.level:
        return node.module or ""
    package = name if modules()[name].name == "__init__.py" else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imported(name: str) -> list[tuple[str, str | None, int]]:
    """(product module, name taken from it or None, line) for each import in module ``name``."""
    known, out = modules(), []
    for node in _imports(tree(name)):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name in known]
            continue
        base = _base(name, node)
        for alias in node.names:
            if f"{base}.{alias.name}" in known:  # `from package import module`
                out.append((f"{base}.{alias.name}", None, node.lineno))
            elif base in known:
                out.append((base, alias.name, node.lineno))
    return out


def import_graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in imported(name) if target != name} for name in modules()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
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


def test_the_checker_finds_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle() -> None:
    graph = import_graph()
    assert len(graph) > 40 and graph["edgepipe.quantization.fakequant"], "the import graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle among product modules: " + " -> ".join(cycle or [])


def test_no_private_name_imported_from_another_module() -> None:
    bad = [f"{modules()[name].relative_to(ROOT)}:{line}: {target}.{what}"
           for name in modules() for target, what, line in imported(name)
           if target != name and what and what.startswith("_") and not what.startswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_stages_do_not_import_measurement() -> None:
    bad = [f"{modules()[name].relative_to(ROOT)}:{line}: {target}"
           for name in modules() if name.startswith("stages.")
           for target, what, line in imported(name)
           if target == "edgepipe.measure" or target.startswith("edgepipe.measure.")
           or (target == "edgepipe" and what == "measure")]
    assert not bad, "a stage measures through ctx.measure (edgepipe.engine.stage), not edgepipe.measure:\n" + \
        "\n".join(bad)


def test_no_file_over_500_lines_without_a_reason() -> None:
    bad = []
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and REASON not in (ast.get_docstring(tree(name)) or ""):
            bad.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not bad, (f"over {MAX_LINES} lines with no '{REASON} ...' in the module docstring:\n"
                     + "\n".join(sorted(bad)))

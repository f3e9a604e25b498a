"""The code stays easy to enter: small modules, short functions, a one-way import graph.

Library code is the top-level modules and the packages (not tests/, bench/ or tools/). Argument parsers
built from a declaration are long lists of `add_argument` calls and are exempt from the function limit.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOT_LIBRARY = {"tests", "bench", "tools", ".venv", "results", "checkpoints", "runs"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
PARSER_BUILDERS = {"build_parser", "parse_args"}


def library_files() -> list[Path]:
    files = []
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).parts
        if parts[0] not in NOT_LIBRARY and not any(p.startswith(".") for p in parts):
            files.append(path)
    return files


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_modules_are_small():
    long = {str(p.relative_to(REPO)): n for p in library_files() if (n := len(p.read_text().splitlines())) >= 450}
    assert not long, f"modules of {MAX_MODULE_LINES} lines or more: {long}"


def test_functions_are_short():
    long = {}
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name not in PARSER_BUILDERS:
                lines = node.end_lineno - node.lineno + 1
                if lines >= MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(REPO)}:{node.lineno} {node.name}"] = lines
    assert not long, f"functions of {MAX_FUNCTION_LINES} lines or more: {long}"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports at module level or in functions (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}  # fmt: skip
    package = module_name(path).rpartition(".")[0] if path.name != "__init__.py" else module_name(path)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module_name(path):
                found.add(name)
    return found


def test_no_import_cycles():
    files = library_files()
    modules = {module_name(p) for p in files}
    graph = {module_name(p): imports_of(p, modules) for p in files}
    # a package imports its own submodules from __init__; that is not a cycle of concerns
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    sys.setrecursionlimit(max(1000, 4 * len(graph)))

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*trail, m, d])}"
            if d not in state:
                visit(d, [*trail, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "lipsync" in graph and "generation" in graph["lipsync"]  # the walk saw the real graph

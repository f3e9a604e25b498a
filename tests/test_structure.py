"""The code stays easy to enter: the root shows what a person runs, modules are small, functions short, and
imports point one way (commands → engine, live, training, evaluation → plumbing), between modules and
between packages, `TYPE_CHECKING` imports included.

Library code is the top-level modules and the packages (not tests/, bench/ or tools/). Argument parsers
built from a declaration are long lists of `add_argument` calls and are exempt from the function limit.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOT_LIBRARY = {"tests", "bench", "tools", ".venv", "results", "checkpoints", "runs"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
PARSER_BUILDERS = {"build_parser", "parse_args"}
COMMANDS = {"inference.py", "preprocess.py", "color_syncnet_train.py", "wav2lip_train.py", "hq_wav2lip_train.py",
            "realtime.py", "app.py", "export_onnx.py"}  # fmt: skip
SHARED_MODULES = {"hparams.py", "audio.py"}  # the design card's modules at the root
PACKAGES = {"common", "lipsync", "live", "training", "models", "face_detection", "evaluation"}
FOLDERS = PACKAGES | {"filelists", "checkpoints", "configs", "tests", "bench", "tools", "docs"}


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


def imports_of(path: Path, modules: set[str], name: str | None = None) -> set[str]:
    """The project modules `path` (module `name`) imports: at module level, in functions and under
    `TYPE_CHECKING` (a type-only import is still a dependency of concerns)."""
    tree = ast.parse(path.read_text())
    name = name or module_name(path)
    package = name.rpartition(".")[0] if path.name != "__init__.py" else name
    found = set()
    for node in ast.walk(tree):
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
        for dep in names:
            while dep and dep not in modules:
                dep = dep.rpartition(".")[0]
            if dep and dep != name:
                found.add(dep)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` (as the list of its nodes, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    sys.setrecursionlimit(max(1000, 4 * len(graph)))

    def visit(m: str, trail: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return [*trail, m, d]
            if d not in state and (cycle := visit(d, [*trail, m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [])):
            return cycle
    return None


def module_graph() -> dict[str, set[str]]:
    files = library_files()
    modules = {module_name(p) for p in files}
    graph = {module_name(p): imports_of(p, modules) for p in files}
    # a package imports its own submodules from __init__; that is not a cycle of concerns
    return {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}


def test_no_import_cycles():
    graph = module_graph()
    assert "lipsync.pipeline" in graph and "lipsync.generation" in graph["lipsync.pipeline"]  # the real graph
    assert (cycle := find_cycle(graph)) is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_cycles_between_packages():
    """Packages (and root modules) as nodes: `common` imports nothing of ours, nothing imports a command."""
    packages: dict[str, set[str]] = {}
    for module, deps in module_graph().items():
        top = module.split(".")[0]
        packages.setdefault(top, set()).update(d.split(".")[0] for d in deps if d.split(".")[0] != top)
    assert (cycle := find_cycle(packages)) is None, f"import cycle between packages: {' -> '.join(cycle)}"
    assert not packages["common"], f"common imports {packages['common']}"
    commands = {c.removesuffix(".py") for c in COMMANDS} - {"wav2lip_train"}  # hq_wav2lip_train is its alias
    assert not {p: deps & commands for p, deps in packages.items() if deps & commands and p not in commands}


def test_the_cycle_finder_sees_type_checking_imports(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import b\n")
    (tmp_path / "b.py").write_text("import a\n")
    graph = {"a": imports_of(a, {"a", "b"}, "a"), "b": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]


def test_the_root_holds_the_commands_and_the_shared_modules():
    root_py = {p.name for p in REPO.glob("*.py")}
    assert root_py == COMMANDS | SHARED_MODULES, f"unexpected at the root: {root_py ^ (COMMANDS | SHARED_MODULES)}"
    for name in COMMANDS:
        tree = ast.parse((REPO / name).read_text())
        guards = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"]
        assert guards, f"{name} has no __main__ guard"
    assert all((REPO / f).is_dir() for f in FOLDERS)
    for package in PACKAGES:
        init = REPO / package / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{package}/__init__.py: no docstring"


def scripts() -> list[Path]:
    """Every file with a __main__ guard: the commands, evaluation's, tools' and the benches."""
    found = [REPO / name for name in sorted(COMMANDS)]
    for folder in ("evaluation", "tools", "bench"):
        found += [p for p in sorted((REPO / folder).rglob("*.py")) if "__main__" in p.read_text()]
    return found


def test_every_script_runs_by_path():
    """`python path/to/script.py --help` from the repository root, and the LSE scripts also from their own
    folder (the original's way); `-m` is the other form, used throughout the tests."""

    def run(path: Path, where: Path) -> tuple[Path, subprocess.CompletedProcess]:
        command = [sys.executable, str(path.relative_to(where)), "--help"]
        return path, subprocess.run(command, cwd=where, capture_output=True, text=True, timeout=300)

    runs = [(p, REPO) for p in scripts()] + [(p, p.parent) for p in (REPO / "evaluation").rglob("calculate_*.py")]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: run(*job), runs))
    failed = {str(p.relative_to(REPO)): r.stderr.strip().splitlines()[-1:] for p, r in results if r.returncode}
    assert not failed, failed
    assert len(results) >= 20

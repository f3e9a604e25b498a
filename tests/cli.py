"""A command run in this process as a person runs it: through `run_cli`, its exit code and its stderr."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from common.errors import run_cli


def cli(argv: list, capsys, main: Callable[[list[str]], None] | None = None) -> tuple[int, str]:
    """Run `main` (inference.py's by default) on `argv`, which must end the command (an error: exit code 2):
    (exit code, stderr)."""
    if main is None:
        import inference

        main = inference.main
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main([str(a) for a in argv]))
    return exit_info.value.code, capsys.readouterr().err

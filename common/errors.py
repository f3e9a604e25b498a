"""User mistakes, reported as one line and a non-zero exit code, never as a traceback.

Each stage raises `UserError` naming the file and the fix; only the scripts' `main()` turn it into output,
through `run_cli`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input or setup that the user can fix; the message is the whole report."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's `main`, turning a `UserError` (or Ctrl-C) into one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

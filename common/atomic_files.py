"""Writing outputs so that no reader ever sees half of one.

Every file the project writes (videos, checkpoints, caches, reports) goes to a temporary name beside its
final path and is renamed over it only once complete: a rename within one folder is atomic, so a run
killed at any moment leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from common.errors import UserError


class PartialFile:
    """A temporary path beside `path`, hidden (dot-prefixed) and unique per writer.

    Write to `.tmp`, then `commit()` to rename it over `path` or `discard()` to delete it. Two writers
    of one path each get their own temporary file, so the last to commit wins with a whole file.
    """

    def __init__(self, path: str | os.PathLike, *, durable: bool = False) -> None:
        self.path = Path(path)
        self.durable = durable  # fsync before the rename: for checkpoints, which must survive a power cut
        self.tmp = self.path.parent / f".{self.path.stem}.partial-{uuid.uuid4().hex[:8]}{self.path.suffix}"

    def commit(self) -> Path:
        if self.durable:
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """A temporary path to write `path` through: renamed to `path` when the block ends normally,
    deleted when it raises. The folder is created."""
    partial = PartialFile(path, durable=durable)
    partial.path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield partial.tmp
        partial.commit()
    finally:
        partial.discard()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def check_writable(folder: str | os.PathLike, flag: str) -> Path:
    """Create `folder` and prove it can be written before any time is spent; `flag` names the option
    that chose it, for the error."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = PartialFile(folder / ".write-test")
        probe.tmp.touch()
        probe.discard()
    except OSError as e:
        raise UserError(f"{folder}: cannot write there ({e.strerror or e}); choose another {flag}") from None
    return folder

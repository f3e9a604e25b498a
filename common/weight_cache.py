"""Prepared weights, kept between runs: a network as it runs (BatchNorm folded, cast, laid out), saved once
and memory-mapped by the runs after.

Preparing the generator from its checkpoint costs about 1 CPU-s on this project's 2-core machine (reading
145 MB, folding, casting, laying out: mostly first touches of fresh memory), all of it before the first frame;
a mapped entry opens in about 0.01 s and its pages are read from the page cache as the first batch needs them.

An entry is keyed by the weight file's resolved path, size and modification time, by what the network is
prepared as (`tag`: the model, the dtype, the preparation's version) and by the torch version, so a replaced
file, another precision, another preparation or another torch makes a new entry and never reads a stale one.
Entries are written under a temporary name and renamed (`atomic_files`), read with `weights_only`, and a
damaged one is rebuilt. The folder keeps the `KEEP` entries used last; only CPU networks are kept (a mapped
file is CPU memory).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from common.atomic_files import atomic_path

M = TypeVar("M", bound=nn.Module)
KEEP = 4  # entries kept in the folder, the most recently used (a generator in bf16 is 73 MB, in fp32 145 MB)
SUFFIX = ".prepared.pt"


def cache_home() -> Path:
    """$XDG_CACHE_HOME/wav2lip (~/.cache/wav2lip): where caches go without --cache_dir (the ONNX exports' too)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wav2lip"


def entry_path(weights: str | os.PathLike, tag: str, cache_dir: str | os.PathLike | None) -> Path:
    """The cache entry of `weights` prepared as `tag`, in `cache_dir`/weights (default: `cache_home()`)."""
    path = Path(weights).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{tag}|{torch.__version__}"
    digest = hashlib.blake2b(key.encode(), digest_size=10).hexdigest()
    folder = Path(cache_dir) if cache_dir is not None else cache_home()
    return folder / "weights" / f"{path.stem}-{tag}-{digest}{SUFFIX}"


def load_prepared(
    weights: str | os.PathLike, tag: str, cache_dir: str | os.PathLike | None,
    load: Callable[[], M], skeleton: Callable[[], M],
) -> M:  # fmt: skip
    """The prepared network of `weights`: mapped from its cache entry, or `load()`ed and kept for next time.

    `load()` reads and prepares the network (its errors are the weight file's); `skeleton()` is the same
    prepared network on the meta device, whose parameters the entry's tensors become.
    """
    entry = entry_path(weights, tag, cache_dir)
    if entry.is_file():
        try:
            model = skeleton()
            model.load_state_dict(torch.load(entry, map_location="cpu", weights_only=True, mmap=True), assign=True)
            os.utime(entry)  # last used: what `prune` keeps
            return model.requires_grad_(False)
        except Exception:  # noqa: BLE001 - a damaged or foreign entry is rebuilt below, never trusted
            entry.unlink(missing_ok=True)
    model = load()
    keep(model, entry)
    return model


def keep(model: nn.Module, entry: Path) -> None:
    """Write `model`'s state as `entry` (atomically) and prune the folder; a folder that cannot be written
    only means no cache."""
    try:
        with atomic_path(entry) as tmp:
            torch.save(model.state_dict(), tmp)
        prune(entry.parent)
    except OSError:
        pass


def prune(folder: Path, keep_count: int = KEEP) -> None:
    """Delete all but the `keep_count` entries used last (a mapped entry stays readable once deleted)."""
    entries = sorted(folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in entries[keep_count:]:
        old.unlink(missing_ok=True)

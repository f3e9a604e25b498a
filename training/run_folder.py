"""A training run's checkpoint folder, safe against the ways runs end badly.

- One run at a time: the trainer holds an exclusive lock on `<folder>/.lock` (`fcntl.flock`, released by
  the kernel however the process ends, SIGKILL included), so a second trainer pointed at the folder
  stops with one line instead of interleaving checkpoints with the first.
- Killed at any moment, even while writing: a checkpoint is written to a hidden temporary file and renamed
  (`files.atomic_path`), so every `checkpoint_step*.pth` is whole; the temporary files a killed run left
  are removed when the next run takes the lock, and `latest_checkpoint` names the newest whole one.
- Divergence: a non-finite loss or weight stops the run with the step and the last good checkpoint in
  one line (`DivergedError`); weights with a NaN or an infinity are never written over a good checkpoint.
- Resume: the optimizer, the RNG states and the step come back from the container; a checkpoint made
  for another `img_size` is refused in one line.
- Any other failure (a bug, a library's error, a full disk) stops the run with one line naming the step
  and the cause (`TrainingError`); the whole traceback goes to `crash.log` beside the checkpoints, so a
  real bug stays debuggable without a traceback reaching the user.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.atomic_files import write_text_atomic
from common.errors import UserError
from common.weights import save_checkpoint
from hparams import HParams

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the folder is not protected there
    fcntl = None

LOCK_NAME = ".lock"
CRASH_LOG = "crash.log"  # the traceback of a run that failed (crash_rank{N}.log for the other ranks)
PARTIAL_GLOB = ".*.partial-*"  # files.PartialFile's temporary names


class DivergedError(UserError):
    """The loss or the weights stopped being finite: the run is stopped before it saves them."""


class TrainingError(UserError):
    """An unexpected error stopped the run: one line for the user, the traceback in the folder's crash log."""


def failure(folder: Path, step: int | None, error: BaseException, rank: int = 0) -> TrainingError:
    """The one line that reports `error` at `step` (None: while setting up), after writing its whole
    traceback to the crash log in `folder` (when the folder takes it)."""
    log = folder / (CRASH_LOG if rank == 0 else f"crash_rank{rank}.log")
    where = "while setting up the run" if step is None else f"step {step}"
    try:
        write_text_atomic(log, f"{where}\n" + "".join(traceback.format_exception(error)))
        kept = f"; the traceback is in {log}"
    except OSError:
        kept = ""
    cause = (str(error).strip().splitlines() or [""])[0]
    cause = f"{type(error).__name__}: {cause}" if cause else type(error).__name__
    return TrainingError(f"{where}: training stopped by an unexpected error ({cause}){kept}")


# --- one run per folder ----------------------------------------------------------------------------------


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold the folder's lock for the block, or raise a one-line `UserError` naming the holder."""
    if fcntl is None:
        yield
        return
    with open(folder / LOCK_NAME, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise UserError(
                f"{folder}: another training run (pid {holder}) is writing checkpoints there; wait for it to "
                "end, or choose another --checkpoint_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_partials(folder: Path) -> list[Path]:
    """Delete the temporary files of checkpoints a killed run was writing (call it holding the lock)."""
    stale = sorted(folder.glob(PARTIAL_GLOB))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# --- checkpoints -----------------------------------------------------------------------------------------


def checkpoint_path(folder: Path, step: int, prefix: str = "") -> Path:
    return folder / f"{prefix}checkpoint_step{step:09d}.pth"


def latest_checkpoint(folder: str | os.PathLike, prefix: str = "") -> Path | None:
    """The newest whole checkpoint in `folder` (temporary files are hidden, so never one of them)."""
    found = sorted(Path(folder).glob(f"{prefix}checkpoint_step*.pth"))
    return found[-1] if found else None


def rng_states() -> dict:
    """Every RNG's state as tensors and lists of ints, so checkpoints load with weights_only=True."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict | None) -> None:
    if not states:
        return
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def check_finite(step: int, losses: Mapping[str, float], last_good: str | os.PathLike | None) -> None:
    """Raise `DivergedError` when a loss of `step` is NaN or infinite."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        raise DivergedError(diverged_message(step, ", ".join(f"{k} {v}" for k, v in bad.items()), last_good))


def finite_or_nan(
    loss_fn: Callable[..., torch.Tensor], a: torch.Tensor, v: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """`loss_fn(a, v, y)` (the expert's BCE), or NaN when the embeddings are not finite: BCE raises on NaN,
    and a diverged run must stop with `DivergedError`'s message, not that traceback."""
    if not (torch.isfinite(a).all() and torch.isfinite(v).all()):
        return torch.full((), float("nan"), device=a.device)
    return loss_fn(a, v, y)


def diverged_message(step: int, what: str, last_good: str | os.PathLike | None) -> str:
    kept = f"the last good checkpoint, {last_good}, is kept" if last_good else "no checkpoint was written yet"
    return (
        f"step {step}: training diverged ({what}); stopped without saving these weights; {kept}: resume from "
        "it with a lower learning rate (--hparams), or check the data"
    )


def save(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    epoch: int,
    hp: HParams,
    *,
    prefix: str = "",
    keep_last: int = 0,
    last_good: str | os.PathLike | None = None,
    **extra: object,
) -> Path:
    """The original container plus hparams and RNG states, written atomically; prunes to `keep_last`.

    Weights that are not all finite are never written: `DivergedError` names the step and `last_good`.
    """
    bad = [n for n, t in getattr(model, "module", model).state_dict().items() if not torch.isfinite(t).all()]
    if bad:
        raise DivergedError(diverged_message(step, f"{len(bad)} tensors not finite, e.g. {bad[0]}", last_good))
    path = checkpoint_path(folder, step, prefix)
    optimizer_state = optimizer if hp.save_optimizer_state else None
    save_checkpoint(path, model, optimizer_state, step, epoch, hparams=hp.values(), rng_states=rng_states(), **extra)
    if keep_last > 0:
        for p in sorted(folder.glob(f"{prefix}checkpoint_step*.pth"))[:-keep_last]:
            p.unlink(missing_ok=True)
    return path


def resume(
    container: dict, optimizer: torch.optim.Optimizer | None, path: str | os.PathLike, hp: HParams | None = None
) -> tuple[int, int]:
    """Restore the optimizer and RNG states from a loaded container; returns (global_step, global_epoch).

    A file with weights only (e.g. to fine-tune) starts at step 0 with a fresh optimizer. A container
    saved with another `img_size` than `hp`'s is refused: its crops would not match this run's.
    """
    saved = (container.get("hparams") or {}).get("img_size")
    if hp is not None and saved is not None and int(saved) != hp.img_size:
        raise UserError(
            f"{path}: this checkpoint was trained with img_size={saved}, this run uses img_size={hp.img_size}; "
            f"resume with --hparams img_size={saved}, or start a new run without --checkpoint_path"
        )
    if optimizer is not None and container.get("optimizer") is not None:
        try:
            optimizer.load_state_dict(container["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: its optimizer state does not fit this model's optimizer ({e})") from None
    set_rng_states(container.get("rng_states"))
    return int(container.get("global_step", 0)), int(container.get("global_epoch", 0))

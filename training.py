"""What the trainers share: one process or N (torchrun), data loading, AMP, checkpoints, logging.

The same script runs on one CPU, one GPU or N GPUs: `torchrun --nproc_per_node N color_syncnet_train.py ...`
sets RANK/WORLD_SIZE/LOCAL_RANK, and `setup()` joins the process group (nccl on GPUs, gloo on CPUs). Rank 0
alone logs and writes checkpoints; each rank reads its own share of the windows (DistributedSampler); eval
losses are averaged over all ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from checkpoints import save_checkpoint
from devices import select_device
from errors import UserError
from hparams import HParams, add_hparams_argument, from_argument


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every trainer has, with the original's names for the original's flags."""
    parser.add_argument("--data_root", required=True, help="root folder of the preprocessed dataset")
    parser.add_argument("--checkpoint_dir", required=True, help="save checkpoints, samples and logs here")
    parser.add_argument("--checkpoint_path", default=None, help="resume (or fine-tune) from this checkpoint")
    parser.add_argument(
        "--filelists_dir", default="filelists", help="folder of train.txt and val.txt, lines '<speaker>/<video>'"
    )
    add_hparams_argument(parser)
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this global step (and save)")
    parser.add_argument("--keep_last", type=int, default=0, help="keep only the newest K checkpoints (0: all)")
    parser.add_argument(
        "--eval_steps", type=int, default=None,
        help="val batches per evaluation, over all ranks (default: as many samples as the original's evaluation)",
    )  # fmt: skip
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: hparams)")
    parser.add_argument(
        "--amp", nargs="?", const="bf16", default="off", choices=["off", "bf16", "fp16"],
        help="mixed precision on CUDA: bf16 (--amp alone), or fp16 with a gradient scaler",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto, cuda, cpu or mps (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_interval", type=int, default=10, help="steps between logged training scalars")
    parser.add_argument("--no_tqdm", action="store_true", help="no progress bar (logs only)")


# --- processes and devices -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """Who this process is: decided once at start-up and passed down."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device_name: str = "auto", seed: int = 0) -> Context:
    """Join torchrun's process group when launched by it; seed every RNG (differently per rank)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
        device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    else:
        device = select_device(device_name)
    seed_everything(seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Context(rank, world_size, device)


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(args: argparse.Namespace) -> Iterator[tuple[HParams, Context, Path, int]]:
    """What a trainer starts with: (hparams, context, checkpoint folder, data-loading workers); the
    process group is left on the way out, however the run ends."""
    hp = from_argument(args.hparams)
    ctx = setup(args.device, args.seed)
    try:
        folder = check_writable(args.checkpoint_dir)
        yield hp, ctx, folder, hp.num_workers if args.num_workers is None else args.num_workers
    finally:
        teardown(ctx)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def wrap_ddp(model: nn.Module, ctx: Context) -> nn.Module:
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


# --- data ------------------------------------------------------------------------------------------------


def make_loader(
    dataset: Dataset, batch_size: int, ctx: Context, *, shuffle: bool, num_workers: int, seed: int, drop_last: bool
) -> DataLoader:
    """A loader over this rank's share of `dataset` (the whole of it in one process); call
    `loader.sampler.set_epoch(epoch)` each epoch for a new order."""
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=ctx.device.type == "cuda",
        drop_last=drop_last and len(dataset) >= batch_size * ctx.world_size,
        persistent_workers=num_workers > 0,
    )


def batches(loader: DataLoader, epoch: int):
    """(epoch, batch) forever, one epoch after another from `epoch`."""
    while True:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def eval_batches(requested: int | None, original: int, ctx: Context) -> int:
    """Val batches each rank evaluates: `--eval_steps` (or the original's count) shared among the ranks."""
    total = original if requested is None else requested
    return max(1, -(-total // ctx.world_size))


# --- mixed precision -------------------------------------------------------------------------------------


def autocast(ctx: Context, amp: str):
    """The forward passes' autocast context: bf16/fp16 on CUDA behind --amp, nothing otherwise."""
    if amp == "off" or ctx.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(ctx: Context, amp: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=amp == "fp16" and ctx.device.type == "cuda")


def check_amp(ctx: Context, amp: str) -> None:
    if amp != "off" and ctx.device.type != "cuda" and ctx.is_main:
        print(f"note: --amp {amp} only applies on CUDA; training in float32 on {ctx.device}", file=sys.stderr)


# --- reductions ------------------------------------------------------------------------------------------


def all_reduce_mean(sums: dict[str, float], count: int, ctx: Context) -> dict[str, float]:
    """Per-key means over every rank's `count` items (each value of `sums` a sum over this rank's)."""
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(t)  # gloo reduces CPU tensors, nccl GPU ones: t lives on this rank's device
    n = max(t[-1].item(), 1)
    return {k: t[i].item() / n for i, k in enumerate(keys)}


# --- checkpoints -----------------------------------------------------------------------------------------


def check_writable(folder: str | os.PathLike) -> Path:
    """Create the checkpoint folder and prove it can be written, before any time is spent training."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"{folder}: --checkpoint_dir cannot be written ({e.strerror or e}); choose a folder you can write to"
        ) from None
    return folder


def checkpoint_path(folder: Path, step: int, prefix: str = "") -> Path:
    return folder / f"{prefix}checkpoint_step{step:09d}.pth"


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
    **extra: object,
) -> Path:
    """The original container plus hparams and RNG states, written atomically; prunes to `keep_last`."""
    path = checkpoint_path(folder, step, prefix)
    save_checkpoint(
        path,
        model,
        optimizer if hp.save_optimizer_state else None,
        step,
        epoch,
        hparams=hp.values(),
        rng_states=rng_states(),
        **extra,
    )
    if keep_last > 0:
        for p in sorted(folder.glob(f"{prefix}checkpoint_step*.pth"))[:-keep_last]:
            p.unlink(missing_ok=True)
    return path


def resume(container: dict, optimizer: torch.optim.Optimizer | None, path: str | os.PathLike) -> tuple[int, int]:
    """Restore the optimizer and RNG states from a loaded container; returns (global_step, global_epoch).

    A file with weights only (e.g. to fine-tune) starts at step 0 with a fresh optimizer.
    """
    if optimizer is not None and container.get("optimizer") is not None:
        try:
            optimizer.load_state_dict(container["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: its optimizer state does not fit this model's optimizer ({e})") from None
    set_rng_states(container.get("rng_states"))
    return int(container.get("global_step", 0)), int(container.get("global_epoch", 0))


# --- logging ---------------------------------------------------------------------------------------------


class Logger:
    """TensorBoard scalars and `log.csv` (wall_time, step, tag, value) in the checkpoint folder; rank 0 only."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.csv = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"))
        except ImportError:
            print("note: tensorboard is not installed; logging to log.csv only", file=sys.stderr)
        path = folder / "log.csv"
        new = not path.exists()
        self.csv_file = open(path, "a", newline="")  # noqa: SIM115 - kept open for the whole run
        self.csv = csv.writer(self.csv_file)
        if new:
            self.csv.writerow(["wall_time", "step", "tag", "value"])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = time.time()
        for tag, value in values.items():
            if self.writer is not None:
                self.writer.add_scalar(tag, value, step)
            self.csv.writerow([f"{now:.3f}", step, tag, f"{value:.6g}"])
        self.csv_file.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.csv is not None:
            self.csv_file.close()


def progress(total: int | None, initial: int, enabled: bool):
    """The tqdm bar of the training loop (a no-op object off rank 0 or with --no_tqdm)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")


class Running:
    """Running means of named losses since the last reset, for tqdm and the logs."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.n = {}, 0


def start_run(folder: Path, ctx, args: argparse.Namespace, hp: HParams, banner: str, step: int):
    """Rank 0 notes how the run was started and says what it trains; every rank gets its logger and bar."""
    logger = Logger(folder, ctx.is_main)
    if ctx.is_main:
        write_options(folder, args, hp)
        print(banner)
    return logger, progress(args.max_steps, step, ctx.is_main and not args.no_tqdm)


def write_options(folder: Path, args: argparse.Namespace, hp: HParams) -> None:
    """A note of how the run was started, beside its checkpoints."""
    lines = [" ".join(sys.argv), *(f"--{k} {v}" for k, v in sorted(vars(args).items()))]
    lines += [f"{k}={v}" for k, v in hp.values().items()]
    (folder / "run_options.txt").write_text("\n".join(lines) + "\n")

"""What the trainers share: their typed config and flags, one process or N (torchrun), data loading, AMP,
checkpoints, logging.

The same script runs on one CPU, one GPU or N GPUs: `torchrun --nproc_per_node N color_syncnet_train.py ...`
sets RANK/WORLD_SIZE/LOCAL_RANK, and `setup()` joins the process group (nccl on GPUs, gloo on CPUs). Rank 0
alone logs and writes checkpoints; each rank reads its own share of the windows (DistributedSampler); eval
losses are averaged over all ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common.atomic_files import check_writable, write_text_atomic
from common.devices import torchrun_rank
from common.errors import UserError
from common.flags import add_arguments, option
from hparams import HParams, add_hparams_argument, from_argument
from training.datasets import Batches, check_batch_size
from training.run_folder import check_finite, exclusive, failure, remove_partials

C = TypeVar("C", bound="TrainConfig")

# --- the config: one declaration per setting, from which the flags are derived ---------------------------


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The flags every trainer has (the original's names for the original's flags), decided once at the
    top and passed down; the command line is derived from these fields, so each default is declared here
    only. Each trainer extends it with its own flags; its `train(config)` is also the Python API."""

    data_root: str = option(help="root folder of the preprocessed dataset")
    checkpoint_dir: str = option(help="save checkpoints, samples and logs here")
    checkpoint_path: str | None = option(None, "resume (or fine-tune) from this checkpoint")
    filelists_dir: str = option("filelists", "folder of train.txt and val.txt, lines '<speaker>/<video>'")
    hparams: HParams = field(default_factory=HParams, metadata={"hparams": True})  # --hparams, parsed
    max_steps: int | None = option(None, "stop after this global step (and save)")
    keep_last: int = option(0, "keep only the newest K checkpoints (0: all)")
    eval_steps: int | None = option(
        None, "val batches per evaluation, over all ranks (default: the original's count; at most one pass over val)"
    )
    num_workers: int | None = option(None, "DataLoader workers (default: hparams)")
    amp: str = option(
        "off", "mixed precision on CUDA: bf16 (--amp alone), or fp16 with a gradient scaler",
        nargs="?", const="bf16", choices=["off", "bf16", "fp16"],
    )  # fmt: skip
    device: str = option("auto", "auto, cuda, cpu or mps (under torchrun: cuda:LOCAL_RANK)")
    seed: int = option(0)
    log_interval: int = option(10, "steps between logged training scalars")
    no_tqdm: bool = option(False, "no progress bar (logs only)")

    @property
    def workers(self) -> int:
        return self.hparams.num_workers if self.num_workers is None else self.num_workers

    def flags(self) -> dict[str, object]:
        """The flag values (hparams aside), as the command line gave them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if "flag" in f.metadata}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[TrainConfig]) -> None:
    """One flag per field of `cls` (flags.add_arguments), and --hparams."""
    add_arguments(parser, cls)
    add_hparams_argument(parser)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The typed config of parsed flags; `--hparams` becomes an `HParams` (a bad name is a UserError)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**values | {"hparams": from_argument(args.hparams)})


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
    rank = torchrun_rank()
    device = rank.local_device(device_name)
    if rank.distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=rank.rank, world_size=rank.world_size)
    random.seed(seed + rank.rank)  # every RNG, differently per rank
    np.random.seed((seed + rank.rank) % 2**32)
    torch.manual_seed(seed + rank.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Context(rank.rank, rank.world_size, device)


@contextlib.contextmanager
def session(config: TrainConfig) -> Iterator[tuple[Context, Path]]:
    """What a trainer starts with: its context and a checkpoint folder proven writable; the process group
    is left on the way out, however the run ends, and an unexpected error is one line (`run_folder.failure`)."""
    ctx = setup(config.device, config.seed)
    if config.amp != "off" and ctx.device.type != "cuda" and ctx.is_main:
        print(f"note: --amp {config.amp} only applies on CUDA; training in float32 on {ctx.device}", file=sys.stderr)
    try:
        folder = check_writable(config.checkpoint_dir, "--checkpoint_dir")
        with exclusive(folder) if ctx.is_main else contextlib.nullcontext():
            if ctx.is_main:
                remove_partials(folder)  # a killed run's half-written checkpoints: ours to remove, holding the lock
            try:
                yield ctx, folder
            except UserError:
                raise
            except Exception as e:  # not in a step (run_loop names those): building the data or the networks
                raise failure(folder, None, e, ctx.rank) from None
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


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
    """This rank's share of `dataset`, in batches never of one sample (`datasets.batch_indices`); call
    `loader.batch_sampler.set_epoch(epoch)` for each epoch's order. A set too small to fill a batch per
    rank keeps all its samples (no `drop_last`)."""
    drop_last = drop_last and len(dataset) >= batch_size * ctx.world_size
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    return DataLoader(
        dataset,
        batch_sampler=Batches(sampler, batch_size, drop_last),
        num_workers=num_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


def loaders(
    train_set: Dataset, val_set: Dataset, batch_size: int, ctx: Context, config: TrainConfig, val_workers: int,
    batch_name: str = "batch_size",
) -> tuple[DataLoader, DataLoader]:  # fmt: skip
    """(train, val) loaders of `batch_size` (the hyperparameter `batch_name`), as the original's; val is
    shuffled with a fixed seed, so every evaluation sees the same windows, with at most `val_workers` workers."""
    check_batch_size(batch_size, batch_name)
    train = make_loader(
        train_set, batch_size, ctx, shuffle=True, num_workers=config.workers, seed=config.seed, drop_last=True
    )
    workers = min(config.workers, val_workers)
    val = make_loader(val_set, batch_size, ctx, shuffle=True, num_workers=workers, seed=1, drop_last=False)
    return train, val


def steps(loader: DataLoader, step: int, epoch: int, max_steps: int | None) -> Iterator[tuple[int, int, Any, bool]]:
    """(step, epoch, batch, last) for each training step after `step`, epoch after epoch of `loader` from
    `epoch`, up to `max_steps` (without it, forever). `last`: the run ends with this step, so it
    evaluates and saves whatever the intervals say."""
    while max_steps is None or step < max_steps:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            step += 1
            yield step, epoch, batch, max_steps is not None and step >= max_steps
            if max_steps is not None and step >= max_steps:
                return
        epoch += 1


@dataclass
class Progress:
    """Where a run stands: its step and epoch, the last evaluation, the last checkpoint written, and the
    last good one (named if the run diverges; the one resumed from until a first is written)."""

    step: int
    epoch: int
    evaluation: dict[str, float] = field(default_factory=dict)
    path: Path | None = None
    good: str | Path | None = None


TrainStep = Callable[[Any, Callable[[dict[str, float]], None]], tuple[dict[str, float], int, dict[str, float], Any]]


def run_loop(
    loader: DataLoader, progress: Progress, max_steps: int | None, ctx: Context, monitor: Monitor, *,
    folder: Path, train_step: TrainStep, evaluate: Callable[[], dict[str, float]], eval_due: Callable[[int], bool],
    save_due: Callable[[int], bool], save: Callable[[int, int, Any, Any], Path],
    evaluated: Callable[[dict[str, float]], dict[str, float]] = lambda evaluation: {},
) -> Progress:  # fmt: skip
    """The loop both trainers run: step, log; evaluate when due; save when due; and at the last step both.
    Any other error than a `UserError` is one line naming the step and the cause (`run_folder.failure`).

    `train_step(batch, check)` trains on one batch, calling `check(losses)` before each optimizer step so
    that a non-finite loss stops the run (`run_folder.DivergedError`) before it reaches the weights; it
    returns (losses, samples, scalars to log, its output for `save`). `evaluated(evaluation)` returns more
    scalars to log with an evaluation (the sync-loss weight it switched on). `save(step, epoch, batch,
    output)` writes the checkpoint on rank 0 and returns its path.
    """
    under_way = progress.step + 1  # the step a failure is named by: fetching its batch counts as part of it
    try:
        for step, epoch, batch, last in steps(loader, progress.step, progress.epoch, max_steps):
            progress.step, progress.epoch = step, epoch
            check = functools.partial(check_finite, progress.step, last_good=progress.good)
            losses, samples, scalars, output = train_step(batch, check)
            monitor.trained(progress.step, progress.epoch, losses, samples, **scalars)
            if eval_due(progress.step) or last:
                progress.evaluation = evaluate()
                check({f"eval {k}": v for k, v in progress.evaluation.items()})
                monitor.evaluated(progress.step, progress.evaluation, **evaluated(progress.evaluation))
            if (save_due(progress.step) or last) and ctx.is_main:
                progress.good = progress.path = save(progress.step, progress.epoch, batch, output)
            under_way = step + 1
    except UserError:
        raise
    except Exception as e:
        raise failure(folder, under_way, e, ctx.rank) from None
    return progress


def eval_batches(requested: int | None, original: int, ctx: Context) -> int:
    """Val batches each rank evaluates: `--eval_steps` (or the original's count) shared among the ranks."""
    total = original if requested is None else requested
    return max(1, -(-total // ctx.world_size))


# --- mixed precision and the optimizer step --------------------------------------------------------------


def autocast(ctx: Context, amp: str) -> contextlib.AbstractContextManager:
    """The forward passes' autocast context: bf16/fp16 on CUDA behind --amp, nothing otherwise."""
    if amp == "off" or ctx.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(ctx: Context, amp: str) -> torch.amp.GradScaler:
    """fp16 needs its gradients scaled to stay representable; bf16 and float32 get a disabled scaler."""
    return torch.amp.GradScaler("cuda", enabled=amp == "fp16" and ctx.device.type == "cuda")


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """Backward and one (scaled) optimizer step, the same for every network trained here. False when the
    fp16 scaler skipped the step (gradients overflowed; it lowers its scale and the next step goes on):
    normal with fp16 now and then, counted and reported, not divergence."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    scaler.step(optimizer)
    scaler.update()
    return not scaler.is_enabled() or scaler.get_scale() >= scale


@dataclass
class Stepper:
    """One network's optimizer and gradient scaler, counting the steps the fp16 scaler skipped (reported at
    the end, not divergence)."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    skipped: int = 0

    def step(self, loss: torch.Tensor) -> None:
        self.skipped += not optimizer_step(loss, self.optimizer, self.scaler)

    def scalars(self, skipped: int | None = None) -> dict[str, float]:
        """The learning rate and the scaler's figures; `skipped`: a total over several networks' steppers."""
        lr = {"lr": self.optimizer.param_groups[0]["lr"]}
        return lr | amp_scalars(self.scaler, self.skipped if skipped is None else skipped)


def amp_scalars(scaler: torch.amp.GradScaler, skipped: int) -> dict[str, float]:
    """What to log of the fp16 scaler: its scale and the steps it skipped so far (nothing without fp16)."""
    return {"amp_scale": scaler.get_scale(), "amp_skipped_steps": skipped} if scaler.is_enabled() else {}


def all_reduce_mean(sums: dict[str, float], count: int, ctx: Context) -> dict[str, float]:
    """Per-key means over every rank's `count` items (each value of `sums` a sum over this rank's)."""
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(t)  # gloo reduces CPU tensors, nccl GPU ones: t lives on this rank's device
    n = max(t[-1].item(), 1)
    return {k: t[i].item() / n for i, k in enumerate(keys)}


@dataclass(frozen=True)
class RunResult:
    """What a finished run leaves, for callers and tests: where it stopped and its last evaluation."""

    step: int
    epoch: int
    eval: dict[str, float]  # the last evaluation's mean losses (empty when no step was run)
    checkpoint: Path | None  # the last checkpoint written (None when no step was run)
    model: nn.Module  # the trained network, unwrapped from DDP


# --- logging ---------------------------------------------------------------------------------------------


@dataclass
class Running:
    """Running means of named losses, for tqdm and the logs."""

    sums: dict[str, float] = field(default_factory=dict)
    n: int = 0

    def add(self, values: dict[str, float]) -> None:
        self.sums = {k: self.sums.get(k, 0.0) + float(v) for k, v in values.items()}
        self.n += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}


class Monitor:
    """What a run tells the user, the same for both trainers. Rank 0 notes how the run was started
    (run_options.txt) and prints a banner; a tqdm bar shows the running losses; every `--log_interval`
    steps their means, the throughput and the given scalars go to TensorBoard and `log.csv` (wall_time,
    step, tag, value); each evaluation is logged and printed. `log.csv` is appended to, so that a resumed
    run continues it: the one file not written atomically. As a context manager, it closes its files
    however the run ends.
    """

    def __init__(self, folder: Path, ctx: Context, config: TrainConfig, banner: str, step: int) -> None:
        from tqdm import tqdm

        self.ctx, self.interval, self.writer, self.csv_file = ctx, config.log_interval, None, None
        show = ctx.is_main and not config.no_tqdm
        self.bar = tqdm(total=config.max_steps, initial=step, disable=not show, dynamic_ncols=True, unit="step")
        self.running, self.shown = Running(), Running()  # since the last log line; since the start
        self.amp_skipped = 0  # optimizer steps skipped by the fp16 scaler, reported at the end
        self.tick = time.time()
        if not ctx.is_main:
            return
        write_options(folder, config)
        print(banner)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"))
        except ImportError:
            print("note: tensorboard is not installed; logging to log.csv only", file=sys.stderr)
        new = not (folder / "log.csv").exists()
        self.csv_file = open(folder / "log.csv", "a", newline="")  # noqa: SIM115 - open for the whole run
        self.csv = csv.writer(self.csv_file)
        if new:
            self.csv.writerow(["wall_time", "step", "tag", "value"])

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.csv_file is not None:
            self.csv_file.close()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log `values` (tag: value) at `step`; a no-op off rank 0."""
        if self.csv_file is None:
            return
        now = time.time()
        for tag, value in values.items():
            if self.writer is not None:
                self.writer.add_scalar(tag, value, step)
            self.csv.writerow([f"{now:.3f}", step, tag, f"{value:.6g}"])
        self.csv_file.flush()

    def trained(self, step: int, epoch: int, losses: dict[str, float], samples: int, **scalars: float) -> None:
        """After each training step: `losses` of this step, `samples` in this rank's batch."""
        self.amp_skipped = int(scalars.get("amp_skipped_steps", 0))
        self.running.add(losses)
        self.shown.add(losses)
        self.bar.update(1)
        self.bar.set_postfix({"epoch": epoch} | {k: f"{v:.4f}" for k, v in self.shown.means().items()})
        if step % self.interval == 0:
            rate = self.running.n * samples * self.ctx.world_size / (time.time() - self.tick)
            values = self.running.means() | scalars | {"samples_per_s": rate}
            self.scalars(step, {f"train/{k}": v for k, v in values.items()})
            self.running, self.tick = Running(), time.time()

    def evaluated(self, step: int, result: dict[str, float], **scalars: float) -> None:
        """After each evaluation: its mean losses, and the training scalars it decided (logged as train/)."""
        self.scalars(step, {f"eval/{k}": v for k, v in result.items()} | {f"train/{k}": v for k, v in scalars.items()})
        if self.ctx.is_main:
            notes = [f"{k} {v:.4f}" for k, v in result.items()] + [f"{k} {v}" for k, v in scalars.items()]
            self.bar.write(f"step {step}: eval " + ", ".join(notes))

    def finished(self, result: RunResult) -> None:
        if self.ctx.is_main:
            losses = ", ".join(f"{k} {v:.4f}" for k, v in result.eval.items())
            self.bar.write(f"step {result.step}: eval {losses}; checkpoint {result.checkpoint}")
            if self.amp_skipped:
                self.bar.write(
                    f"note: the fp16 gradient scaler skipped {self.amp_skipped} steps (overflow; not divergence)"
                )


def write_options(folder: Path, config: TrainConfig) -> None:
    """A note of how the run was started, beside its checkpoints."""
    lines = [" ".join(sys.argv), *(f"--{k} {v}" for k, v in config.flags().items())]
    lines += [f"{k}={v}" for k, v in config.hparams.values().items()]
    write_text_atomic(folder / "run_options.txt", "\n".join(lines) + "\n")

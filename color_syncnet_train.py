"""Train the lip-sync expert, SyncNet_color (paper §3.1), as the original color_syncnet_train.py.

    python color_syncnet_train.py --data_root lrs2_preprocessed/ --checkpoint_dir checkpoints/expert/
    torchrun --nproc_per_node 4 color_syncnet_train.py --data_root ... --checkpoint_dir ...

Each sample is 5 consecutive face crops (lower half, frames stacked on channels) and the 16 mel columns
(0.2 s) of the first frame's window; half the time the crops come from another window of the same video
(y=0). The loss is BCE on the cosine similarity of the two embeddings; Adam, lr `syncnet_lr` (1e-4),
batch `syncnet_batch_size` (64). Evaluation every `syncnet_eval_interval` steps over `--eval_steps`
batches of the val split (default: one window per val video, as the original), checkpoints every `syncnet_checkpoint_interval` steps.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common.errors import run_cli
from common.flags import option
from common.weights import load_weights
from models import SyncNet_color, cosine_loss
from training import loop, run_folder
from training.datasets import SyncDataset

EVAL_STEPS = 1400  # the original's cap on batches per evaluation; it also stopped after one pass of its
# loader, whose length was the number of val videos: so one window per val video, ~17 batches on LRS2


@dataclass(frozen=True, kw_only=True)
class ExpertConfig(loop.TrainConfig):
    """Everything a run of the expert needs: the common flags and the expert's own."""

    neg_min_offset: int = option(0, "negatives at least this many frames from the positive")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="color_syncnet_train.py"
    )
    loop.add_config_arguments(parser, ExpertConfig)
    return parser


def config_from_argv(argv: list[str] | None = None) -> ExpertConfig:
    return loop.config_from_args(ExpertConfig, build_parser().parse_args(argv))


def loss_of(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], ctx: loop.Context, amp: str) -> torch.Tensor:
    """The expert's BCE on one batch (x, mel, y): forward under autocast, the loss in float32."""
    x, mel, y = (t.to(ctx.device, non_blocking=True) for t in batch)
    with loop.autocast(ctx, amp):
        a, v = model(mel, x)
    return run_folder.finite_or_nan(cosine_loss, a.float(), v.float(), y)


def evaluate(model: SyncNet_color, loader: DataLoader, ctx: loop.Context, amp: str, max_batches: int) -> float:
    """Mean BCE of the expert over up to `max_batches` val batches per rank, averaged over all ranks."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            total += loss_of(model, batch, ctx, amp).item() * len(batch[2])
            count += len(batch[2])
    model.train()
    return loop.all_reduce_mean({"loss": total}, count, ctx)["loss"]


def train(config: ExpertConfig) -> loop.RunResult:
    """The whole run, from the config to the last checkpoint; returns where it stopped."""
    hp = config.hparams
    with loop.session(config) as (ctx, folder):
        # data
        train_set, val_set = (
            SyncDataset(config.data_root, split, config.filelists_dir, hp, neg_min_offset=config.neg_min_offset)
            for split in ("train", "val")
        )
        original_eval = min(EVAL_STEPS, math.ceil(len(val_set.videos) / hp.syncnet_batch_size))
        eval_steps = loop.eval_batches(config.eval_steps, original_eval, ctx)
        train_loader, val_loader = loop.loaders(
            train_set, val_set, hp.syncnet_batch_size, ctx, config, 8, "syncnet_batch_size"
        )

        # model, optimizer, resume
        model = SyncNet_color().to(ctx.device)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=hp.syncnet_lr)
        start = 0, 0  # (step, epoch)
        if config.checkpoint_path:
            container = load_weights(model, config.checkpoint_path, "SyncNet_color", "--checkpoint_path")
            start = run_folder.resume(container, optimizer, config.checkpoint_path, hp)
        ddp_model = loop.wrap_ddp(model, ctx)
        stepper = loop.Stepper(optimizer, loop.grad_scaler(ctx, config.amp))

        def train_step(batch: tuple[torch.Tensor, ...], check: Callable[[dict[str, float]], None]) -> tuple:
            loss = loss_of(ddp_model, batch, ctx, config.amp)
            losses = {"loss": loss.item()}
            check(losses)  # before the step: a NaN never reaches the weights
            stepper.step(loss)
            return losses, len(batch[2]), stepper.scalars(), None

        def save(step: int, epoch: int, batch: object, output: object) -> Path:
            return run_folder.save(folder, model, optimizer, step, epoch, hp, keep_last=config.keep_last,
                                   last_good=progress.good)  # fmt: skip

        progress = loop.Progress(*start, good=config.checkpoint_path)
        banner = (f"expert: {len(train_set)} train / {len(val_set)} val windows, {ctx.world_size} process(es) on "
                  f"{ctx.device}, from step {progress.step}")  # fmt: skip
        with loop.Monitor(folder, ctx, config, banner, progress.step) as monitor:
            loop.run_loop(
                train_loader, progress, config.max_steps, ctx, monitor, folder=folder, train_step=train_step, save=save,
                evaluate=lambda: {"loss": evaluate(model, val_loader, ctx, config.amp, eval_steps)},
                eval_due=lambda step: step % hp.syncnet_eval_interval == 0,
                save_due=lambda step: step % hp.syncnet_checkpoint_interval == 0,
            )  # fmt: skip
            result = loop.RunResult(progress.step, progress.epoch, progress.evaluation, progress.path, model)
            monitor.finished(result)
        return result


def main(argv: list[str] | None = None) -> None:
    train(config_from_argv(argv))


if __name__ == "__main__":
    run_cli(main)

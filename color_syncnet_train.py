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
import time

import torch

import training
from checkpoints import load_weights
from data import SyncDataset
from errors import run_cli
from models import SyncNet_color, cosine_loss

EVAL_STEPS = 1400  # the original's cap on batches per evaluation; it also stopped after one pass of its
# loader, whose length was the number of val videos: so one window per val video, ~17 batches on LRS2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="color_syncnet_train.py"
    )
    training.add_common_arguments(parser)
    parser.add_argument(
        "--neg_min_offset", type=int, default=0, help="negatives at least this many frames from the positive"
    )
    return parser


def evaluate(model, loader, ctx: training.Context, amp: str, max_batches: int) -> float:
    """Mean BCE of the expert over up to `max_batches` val batches per rank, averaged over all ranks."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, (x, mel, y) in enumerate(loader):
            if i >= max_batches:
                break
            x, mel, y = (t.to(ctx.device, non_blocking=True) for t in (x, mel, y))
            with training.autocast(ctx, amp):
                a, v = model(mel, x)
            total += cosine_loss(a.float(), v.float(), y).item() * len(y)
            count += len(y)
    model.train()
    return training.all_reduce_mean({"loss": total}, count, ctx)["loss"]


def train(args: argparse.Namespace) -> dict:
    """The whole run; returns the final step, eval loss, checkpoint path and the (unwrapped) model."""
    with training.session(args) as (hp, ctx, folder, workers):
        # data
        train_set = SyncDataset(args.data_root, "train", args.filelists_dir, hp, neg_min_offset=args.neg_min_offset)
        val_set = SyncDataset(args.data_root, "val", args.filelists_dir, hp, neg_min_offset=args.neg_min_offset)
        original_eval = min(EVAL_STEPS, math.ceil(len(val_set.videos) / hp.syncnet_batch_size))
        eval_steps = training.eval_batches(args.eval_steps, original_eval, ctx)
        train_loader = training.make_loader(
            train_set, hp.syncnet_batch_size, ctx, shuffle=True, num_workers=workers, seed=args.seed, drop_last=True
        )
        val_loader = training.make_loader(
            val_set, hp.syncnet_batch_size, ctx, shuffle=True, num_workers=min(workers, 8), seed=1, drop_last=False
        )  # the same val windows at every evaluation

        # model, optimizer, resume
        model = SyncNet_color().to(ctx.device)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=hp.syncnet_lr)
        step, epoch = 0, 0
        if args.checkpoint_path:
            container = load_weights(model, args.checkpoint_path, "SyncNet_color", "--checkpoint_path")
            step, epoch = training.resume(container, optimizer, args.checkpoint_path)
        ddp_model = training.wrap_ddp(model, ctx)
        scaler = training.grad_scaler(ctx, args.amp)
        training.check_amp(ctx, args.amp)

        banner = (f"expert: {len(train_set)} train / {len(val_set)} val windows, {ctx.world_size} process(es) on "
                  f"{ctx.device}, from step {step}")  # fmt: skip
        logger, bar = training.start_run(folder, ctx, args, hp, banner, step)
        running, shown = training.Running(), training.Running()
        data = training.batches(train_loader, epoch)
        eval_loss, saved_at, evaluated_at = None, None, None
        tick = time.time()

        # the loop
        while args.max_steps is None or step < args.max_steps:
            epoch, (x, mel, y) = next(data)
            x, mel, y = (t.to(ctx.device, non_blocking=True) for t in (x, mel, y))
            with training.autocast(ctx, args.amp):
                a, v = ddp_model(mel, x)
            loss = cosine_loss(a.float(), v.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1

            running.add(loss=loss.item())
            shown.add(loss=loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{shown.means()['loss']:.4f}")
            if step % args.log_interval == 0:
                rate = running.n * len(y) * ctx.world_size / (time.time() - tick)
                lr = optimizer.param_groups[0]["lr"]
                logger.scalars(
                    step, {"train/loss": running.means()["loss"], "train/lr": lr, "train/samples_per_s": rate}
                )
                running.reset()
                tick = time.time()

            if step % hp.syncnet_eval_interval == 0:
                eval_loss, evaluated_at = evaluate(model, val_loader, ctx, args.amp, eval_steps), step
                logger.scalars(step, {"eval/loss": eval_loss})
                if ctx.is_main:
                    bar.write(f"step {step}: eval loss {eval_loss:.4f}")
            if step % hp.syncnet_checkpoint_interval == 0 and ctx.is_main:
                training.save(folder, model, optimizer, step, epoch, hp, keep_last=args.keep_last)
                saved_at = step

        # the end (--max_steps): evaluate and save unless this step just did
        if evaluated_at != step:
            eval_loss = evaluate(model, val_loader, ctx, args.amp, eval_steps)
            logger.scalars(step, {"eval/loss": eval_loss})
        path = training.checkpoint_path(folder, step)
        if saved_at != step and ctx.is_main:
            path = training.save(folder, model, optimizer, step, epoch, hp, keep_last=args.keep_last)
        bar.close()
        logger.close()
        if ctx.is_main:
            print(f"step {step}: eval loss {eval_loss:.4f}; checkpoint {path}")
        return {"step": step, "epoch": epoch, "eval_loss": eval_loss, "checkpoint": path, "model": model}


def main(argv: list[str] | None = None) -> dict:
    return train(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)

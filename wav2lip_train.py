"""Train the Wav2Lip generator (paper §3.2), with `--gan` the visual-quality discriminator too (§3.3).

    python wav2lip_train.py --data_root lrs2_preprocessed/ --checkpoint_dir checkpoints/wav2lip/ \
        --syncnet_checkpoint_path checkpoints/lipsync_expert.pth [--gan]
    torchrun --nproc_per_node 4 wav2lip_train.py ...

Without --gan, as the original wav2lip_train.py: loss = syncnet_wt · sync + (1 − syncnet_wt) · L1, Adam
with lr `initial_learning_rate`. With --gan, as the original hq_wav2lip_train.py (`hq_wav2lip_train.py`
is this script with --gan): loss = syncnet_wt · sync + disc_wt · perceptual + (1 − syncnet_wt − disc_wt) · L1,
Adam with betas (0.5, 0.999) for both networks, and the discriminator learns real (ground truth) against
fake (generated) lower halves after each generator step.

The sync loss is the frozen expert's BCE on the generated window against "in sync". Its weight
`syncnet_wt` starts at the hparams value (0) and becomes 0.01 (0.03 with --gan) once the eval sync loss
is below 0.75; unlike the original, the weight is saved in each checkpoint and restored on resume.

The frozen expert's BatchNorm: the original never calls `.eval()` on the expert, so its BatchNorm layers
normalise each batch of generated frames with that batch's own statistics (and keep updating running
statistics that are never used). That is the default here, for faithfulness. `--expert_eval_mode` puts
the expert in eval mode instead: it normalises with the running statistics it learned on real faces,
which is how the expert scores at evaluation time, and makes the sync loss of a sample independent of the
rest of its batch. Results and the 0.75 switch-over point differ between the two.

Evaluation (L1, sync loss; with --gan the perceptual and discriminator losses) runs at step 1 and every
`eval_interval` steps over `--eval_steps` val batches; checkpoints (`checkpoint_step*.pth`, with --gan also
`disc_checkpoint_step*.pth`) and sample collages (`samples_step*/`: reference | masked input | generated |
ground truth) every `checkpoint_interval` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import training
from checkpoints import load_weights
from data import SYNCNET_T, Wav2LipDataset
from errors import run_cli
from models import SyncNet_color, Wav2Lip, Wav2Lip_disc_qual, cosine_loss

EVAL_STEPS = 700  # the original's batches per evaluation, cycling through its loader
EVAL_STEPS_GAN = 300  # hq_wav2lip_train.py's cap; it stopped after one pass (one window per val video)
SYNC_SWITCH_LOSS = 0.75  # the eval sync loss under which the sync loss is switched on
SYNC_WT_ON, SYNC_WT_ON_GAN = 0.01, 0.03


def build_parser(gan_default: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        prog="hq_wav2lip_train.py" if gan_default else "wav2lip_train.py",
    )
    training.add_common_arguments(parser)
    parser.add_argument(
        "--syncnet_checkpoint_path", required=True, help="the trained expert (e.g. checkpoints/lipsync_expert.pth)"
    )
    parser.add_argument("--disc_checkpoint_path", default=None, help="resume the discriminator from this (--gan)")
    parser.add_argument(
        "--gan", action="store_true", default=gan_default, help="train with the visual-quality discriminator"
    )
    parser.add_argument(
        "--expert_eval_mode", action="store_true", help="frozen expert in eval mode (default: train mode, as original)"
    )
    return parser


def sync_loss(syncnet, mel: torch.Tensor, g: torch.Tensor, ctx, amp: str) -> torch.Tensor:
    """The expert's BCE of the generated window (B, 3, T, H, W) against "in sync": lower halves, frames on channels."""
    lower = g[:, :, :, g.size(3) // 2 :]
    frames = torch.cat([lower[:, :, i] for i in range(SYNCNET_T)], dim=1)
    with training.autocast(ctx, amp):
        a, v = syncnet(mel, frames)
    return cosine_loss(a.float(), v.float(), torch.ones(len(g), 1, device=g.device))


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """No parameter gradients inside (the input still gets its gradient)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def perceptual_loss(disc, g: torch.Tensor, ctx, amp: str) -> torch.Tensor:
    """The generator's adversarial loss: BCE of the discriminator on generated frames against "real".

    The discriminator's own gradients are not needed here (the original computed and then zeroed them), so
    its parameters are frozen and its DDP wrapper bypassed.
    """
    with frozen(training.unwrap(disc)) as d, training.autocast(ctx, amp):
        pred = d(g)
    pred = pred.float()
    return F.binary_cross_entropy(pred, torch.ones_like(pred))


def disc_losses(disc, gt: torch.Tensor, g: torch.Tensor, ctx, amp: str) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE of the discriminator on real (label 1) and generated (label 0) frames, in one forward pass.

    The discriminator has no batch statistics, so one pass over both equals the original's two.
    """
    batch = len(gt)
    with training.autocast(ctx, amp):
        pred = disc(torch.cat([gt, g.detach()]))
    pred = pred.float().view(gt.size(2), 2 * batch)  # rows are time-major: t * 2B + b
    real, fake = pred[:, :batch], pred[:, batch:]
    return F.binary_cross_entropy(real, torch.ones_like(real)), F.binary_cross_entropy(fake, torch.zeros_like(fake))


def save_sample_images(x: torch.Tensor, g: torch.Tensor, gt: torch.Tensor, step: int, folder: Path) -> None:
    """The original's collages: per sample and frame, reference | masked input | generated | ground truth."""

    def to_uint8(t):
        return (t.detach().float().cpu().numpy().transpose(0, 2, 3, 4, 1) * 255.0).astype(np.uint8)

    x, g, gt = to_uint8(x), to_uint8(g), to_uint8(gt)
    refs, inps = x[..., 3:], x[..., :3]
    out = folder / f"samples_step{step:09d}"
    out.mkdir(exist_ok=True)
    collage = np.concatenate((refs, inps, g, gt), axis=-2)
    for b, frames in enumerate(collage):
        for t, frame in enumerate(frames):
            cv2.imwrite(str(out / f"{b}_{t}.jpg"), frame)


def evaluate(model, syncnet, disc, loader, ctx: training.Context, amp: str, max_batches: int) -> dict[str, float]:
    """Mean eval losses over up to `max_batches` val batches per rank, averaged over all ranks."""
    model.eval()
    if disc is not None:
        disc.eval()
    sums, count = {}, 0
    with torch.no_grad():
        for i, (x, indiv_mels, mel, gt) in enumerate(loader):
            if i >= max_batches:
                break
            x, indiv_mels, mel, gt = (t.to(ctx.device, non_blocking=True) for t in (x, indiv_mels, mel, gt))
            with training.autocast(ctx, amp):
                g = model(indiv_mels, x)
            g = g.float()
            losses = {"l1": F.l1_loss(g, gt), "sync_loss": sync_loss(syncnet, mel, g, ctx, amp)}
            if disc is not None:
                losses["perceptual"] = perceptual_loss(disc, g, ctx, amp)
                losses["disc_real"], losses["disc_fake"] = disc_losses(disc, gt, g, ctx, amp)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(gt)
            count += len(gt)
    model.train()
    if disc is not None:
        disc.train()
    return training.all_reduce_mean(sums, count, ctx)


def train(args: argparse.Namespace) -> dict:
    """The whole run; returns the final step, eval losses, syncnet_wt, checkpoint path and the model."""
    with training.session(args) as (hp, ctx, folder, workers):
        disc_wt = hp.disc_wt if args.gan else 0.0

        # data
        train_set = Wav2LipDataset(args.data_root, "train", args.filelists_dir, hp)
        val_set = Wav2LipDataset(args.data_root, "val", args.filelists_dir, hp)
        gan_eval = min(EVAL_STEPS_GAN, math.ceil(len(val_set.videos) / hp.batch_size))
        eval_steps = training.eval_batches(args.eval_steps, gan_eval if args.gan else EVAL_STEPS, ctx)
        train_loader = training.make_loader(
            train_set, hp.batch_size, ctx, shuffle=True, num_workers=workers, seed=args.seed, drop_last=True
        )
        val_loader = training.make_loader(
            val_set, hp.batch_size, ctx, shuffle=True, num_workers=min(workers, 4), seed=1, drop_last=False
        )

        # the frozen expert
        syncnet = SyncNet_color().to(ctx.device)
        load_weights(syncnet, args.syncnet_checkpoint_path, "SyncNet_color", "--syncnet_checkpoint_path")
        for p in syncnet.parameters():
            p.requires_grad_(False)
        syncnet.train(not args.expert_eval_mode)

        # generator (and discriminator), optimizers, resume
        betas = (0.5, 0.999) if args.gan else (0.9, 0.999)
        model = Wav2Lip().to(ctx.device)
        optimizer = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], hp.initial_learning_rate, betas
        )
        step, epoch, syncnet_wt = 0, 0, hp.syncnet_wt
        if args.checkpoint_path:
            container = load_weights(model, args.checkpoint_path, "Wav2Lip", "--checkpoint_path")
            step, epoch = training.resume(container, optimizer, args.checkpoint_path)
            syncnet_wt = float(container.get("syncnet_wt", syncnet_wt))
        disc = disc_optimizer = None
        if args.gan:
            disc = Wav2Lip_disc_qual().to(ctx.device)
            disc_optimizer = torch.optim.Adam(
                [p for p in disc.parameters() if p.requires_grad], hp.disc_initial_learning_rate, (0.5, 0.999)
            )
            if args.disc_checkpoint_path:
                container = load_weights(disc, args.disc_checkpoint_path, "Wav2Lip_disc_qual", "--disc_checkpoint_path")
                training.resume(container, disc_optimizer, args.disc_checkpoint_path)
        ddp_model = training.wrap_ddp(model, ctx)
        ddp_disc = training.wrap_ddp(disc, ctx) if disc is not None else None
        scaler, disc_scaler = training.grad_scaler(ctx, args.amp), training.grad_scaler(ctx, args.amp)
        training.check_amp(ctx, args.amp)

        banner = (f"generator{' + GAN' if args.gan else ''}: {len(train_set)} train / {len(val_set)} val windows, "
                  f"{ctx.world_size} process(es) on {ctx.device}, from step {step}, syncnet_wt {syncnet_wt}")  # fmt: skip
        logger, bar = training.start_run(folder, ctx, args, hp, banner, step)
        running, shown = training.Running(), training.Running()
        data = training.batches(train_loader, epoch)
        last_eval, saved_at, evaluated_at, last_batch = {}, None, None, None
        tick = time.time()

        def checkpoint(x, g, gt) -> Path:
            extra = {"syncnet_wt": syncnet_wt, "gan": args.gan}
            path = training.save(folder, model, optimizer, step, epoch, hp, keep_last=args.keep_last, **extra)
            if disc is not None:
                training.save(folder, disc, disc_optimizer, step, epoch, hp, prefix="disc_", keep_last=args.keep_last)
            save_sample_images(x, g, gt, step, folder)
            return path

        def run_eval() -> dict[str, float]:
            nonlocal syncnet_wt
            result = evaluate(model, syncnet, disc, val_loader, ctx, args.amp, eval_steps)
            if result["sync_loss"] < SYNC_SWITCH_LOSS:  # switch on; never lower a weight set with --hparams
                syncnet_wt = max(syncnet_wt, SYNC_WT_ON_GAN if args.gan else SYNC_WT_ON)
            logger.scalars(step, {f"eval/{k}": v for k, v in result.items()} | {"train/syncnet_wt": syncnet_wt})
            if ctx.is_main:
                bar.write(f"step {step}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
                          + f"; syncnet_wt {syncnet_wt}")  # fmt: skip
            return result

        # the loop
        while args.max_steps is None or step < args.max_steps:
            epoch, (x, indiv_mels, mel, gt) = next(data)
            x, indiv_mels, mel, gt = (t.to(ctx.device, non_blocking=True) for t in (x, indiv_mels, mel, gt))

            # the generator
            with training.autocast(ctx, args.amp):
                g = ddp_model(indiv_mels, x)
            g = g.float()
            l1 = F.l1_loss(g, gt)
            sync = sync_loss(syncnet, mel, g, ctx, args.amp) if syncnet_wt > 0 else torch.zeros((), device=g.device)
            percep = perceptual_loss(disc, g, ctx, args.amp) if disc_wt > 0 else torch.zeros((), device=g.device)
            loss = syncnet_wt * sync + disc_wt * percep + (1.0 - syncnet_wt - disc_wt) * l1
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

            # the discriminator: real against generated
            losses = {"l1": l1.item(), "sync_loss": sync.item()}
            if disc is not None:
                real, fake = disc_losses(ddp_disc, gt, g, ctx, args.amp)
                disc_optimizer.zero_grad(set_to_none=True)
                disc_scaler.scale(real + fake).backward()
                disc_scaler.step(disc_optimizer)
                disc_scaler.update()
                losses |= {"perceptual": percep.item(), "disc_real": real.item(), "disc_fake": fake.item()}
            step += 1
            last_batch = (x, g, gt)

            running.add(**losses)
            shown.add(**losses)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in shown.means().items()} | {"wt": syncnet_wt})
            if step % args.log_interval == 0:
                rate = running.n * len(gt) * ctx.world_size / (time.time() - tick)
                scalars = {f"train/{k}": v for k, v in running.means().items()}
                scalars |= {"train/syncnet_wt": syncnet_wt, "train/lr": optimizer.param_groups[0]["lr"]}
                logger.scalars(step, scalars | {"train/samples_per_s": rate})
                running.reset()
                tick = time.time()

            if step % hp.checkpoint_interval == 0 and ctx.is_main:
                checkpoint(x, g, gt)
                saved_at = step
            if step == 1 or step % hp.eval_interval == 0:
                last_eval, evaluated_at = run_eval(), step

        # the end (--max_steps): evaluate and save unless this step just did
        if evaluated_at != step:
            last_eval = run_eval()
        path = training.checkpoint_path(folder, step)
        if saved_at != step and ctx.is_main and last_batch is not None:
            path = checkpoint(*last_batch)
        bar.close()
        logger.close()
        return {"step": step, "epoch": epoch, "eval": last_eval, "syncnet_wt": syncnet_wt, "checkpoint": path,
                "model": model, "disc": disc}  # fmt: skip


def main(argv: list[str] | None = None, gan_default: bool = False) -> dict:
    return train(build_parser(gan_default).parse_args(argv))


if __name__ == "__main__":
    run_cli(main)

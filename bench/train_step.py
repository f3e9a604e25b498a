"""Seconds per training step (forward + backward + optimizer step) of the expert and the generator.

    python -m bench.train_step                  # expert batch 64, generator batch 16 with the sync loss
    python -m bench.train_step --device cuda --amp bf16

Random inputs of the real shapes; the data loading is not timed (`python -m bench.dataloader` times it).
The steps are the trainers' own (`color_syncnet_train.loss_of`, `wav2lip_train.train_step`): the generator
step includes the frozen expert's sync loss (syncnet_wt > 0) and, with --gan, the discriminator's
perceptual loss and its own step.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python bench/train_step.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time
from collections.abc import Callable

import torch

import color_syncnet_train
import wav2lip_train
from models import SyncNet_color, Wav2Lip, Wav2Lip_disc_qual
from training import loop


def timed(step: Callable[[], object], warmup: int, steps: int, device: torch.device) -> float:
    """Mean seconds per call of `step` after `warmup` calls, waiting for the GPU's queue at both ends."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def expert_step(expert: SyncNet_color, batch: int, ctx: loop.Context, amp: str) -> Callable[[], None]:
    """One training step of the expert on a fixed random batch, as color_syncnet_train.py takes it."""
    dev = ctx.device
    x, mel = torch.rand(batch, 15, 48, 96, device=dev), torch.randn(batch, 1, 80, 16, device=dev)
    data = (x, mel, torch.ones(batch, 1, device=dev))  # faces, mel, label "in sync"
    optimizer, scaler = torch.optim.Adam(expert.parameters(), 1e-4), loop.grad_scaler(ctx, amp)

    def step() -> None:
        loop.optimizer_step(color_syncnet_train.loss_of(expert, data, ctx, amp), optimizer, scaler)

    return step


def generator_step(expert: SyncNet_color, batch: int, gan: bool, ctx: loop.Context, amp: str) -> Callable[[], None]:
    """One step of wav2lip_train.py's loop (generator, then with `gan` the discriminator), sync loss on."""
    dev = ctx.device
    gen = Wav2Lip().to(dev)
    disc = Wav2Lip_disc_qual().to(dev) if gan else None
    nets = wav2lip_train.Networks(
        model=gen,
        stepper=loop.Stepper(torch.optim.Adam(gen.parameters(), 1e-4), loop.grad_scaler(ctx, amp)),
        syncnet=expert.requires_grad_(False),
        disc=disc,
        disc_stepper=loop.Stepper(torch.optim.Adam(disc.parameters(), 1e-4), loop.grad_scaler(ctx, amp))
        if disc is not None
        else None,
        ddp_model=gen,
        ddp_disc=disc,
    )
    faces, gt = torch.rand(batch, 6, 5, 96, 96, device=dev), torch.rand(batch, 3, 5, 96, 96, device=dev)
    indiv, mel = torch.randn(batch, 5, 1, 80, 16, device=dev), torch.randn(batch, 1, 80, 16, device=dev)
    syncnet_wt, disc_wt = (wav2lip_train.SYNC_WT_ON_GAN, 0.07) if gan else (wav2lip_train.SYNC_WT_ON, 0.0)

    def step() -> None:
        wav2lip_train.train_step(nets, [faces, indiv, mel, gt], syncnet_wt, disc_wt, ctx, amp)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    parser.add_argument("--expert_batch", type=int, default=64)
    parser.add_argument("--generator_batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gan", action="store_true")
    args = parser.parse_args(argv)
    ctx = loop.setup(args.device)
    dev = ctx.device

    expert, b = SyncNet_color().to(dev), args.expert_batch
    t = timed(expert_step(expert, b, ctx, args.amp), args.warmup, args.steps, dev)
    print(f"expert        batch {b:3d}: {t:7.3f} s/step  ({b / t:7.1f} samples/s) on {dev}, amp {args.amp}")

    b = args.generator_batch
    t = timed(generator_step(expert, b, args.gan, ctx, args.amp), args.warmup, args.steps, dev)
    what = "generator+GAN" if args.gan else "generator"
    print(f"{what:13s} batch {b:3d}: {t:7.3f} s/step  ({b / t:7.1f} samples/s), sync loss on")


if __name__ == "__main__":
    main()

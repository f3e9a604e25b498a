"""Seconds per training step (forward + backward + optimizer step) of the expert and the generator.

    python bench/train_step.py                  # expert batch 64, generator batch 16 with the sync loss
    python bench/train_step.py --device cuda --amp bf16

Random inputs of the real shapes; the data loading is not timed (bench/dataloader.py times it).
The generator step includes the frozen expert's sync loss (syncnet_wt > 0) and, with --gan, the
discriminator's perceptual loss and its own step.
"""

from __future__ import annotations

import argparse
import time

import torch

import training  # noqa: E402
import wav2lip_train  # noqa: E402
from models import SyncNet_color, Wav2Lip, Wav2Lip_disc_qual, cosine_loss  # noqa: E402


def timed(step, warmup: int, steps: int, device: torch.device) -> float:
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    parser.add_argument("--expert_batch", type=int, default=64)
    parser.add_argument("--generator_batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gan", action="store_true")
    args = parser.parse_args(argv)
    ctx = training.setup(args.device)
    dev = ctx.device

    expert = SyncNet_color().to(dev)
    opt = torch.optim.Adam(expert.parameters(), 1e-4)
    b = args.expert_batch
    x, mel, y = (
        torch.rand(b, 15, 48, 96, device=dev),
        torch.randn(b, 1, 80, 16, device=dev),
        torch.ones(b, 1, device=dev),
    )

    def expert_step():
        with training.autocast(ctx, args.amp):
            a, v = expert(mel, x)
        loss = cosine_loss(a.float(), v.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_expert = timed(expert_step, args.warmup, args.steps, dev)
    print(f"expert     batch {b:3d}: {t_expert:7.3f} s/step  ({b / t_expert:7.1f} samples/s) on {dev}")

    for p in expert.parameters():
        p.requires_grad_(False)
    gen = Wav2Lip().to(dev)
    gopt = torch.optim.Adam(gen.parameters(), 1e-4)
    disc = Wav2Lip_disc_qual().to(dev) if args.gan else None
    dopt = torch.optim.Adam(disc.parameters(), 1e-4) if disc is not None else None
    b = args.generator_batch
    faces, gt = torch.rand(b, 6, 5, 96, 96, device=dev), torch.rand(b, 3, 5, 96, 96, device=dev)
    indiv, mel1 = torch.randn(b, 5, 1, 80, 16, device=dev), torch.randn(b, 1, 80, 16, device=dev)

    def generator_step():
        with training.autocast(ctx, args.amp):
            g = gen(indiv, faces)
        g = g.float()
        loss = 0.97 * torch.nn.functional.l1_loss(g, gt) + 0.03 * wav2lip_train.sync_loss(
            expert, mel1, g, ctx, args.amp
        )
        if disc is not None:
            loss = loss + 0.07 * wav2lip_train.perceptual_loss(disc, g, ctx, args.amp)
        gopt.zero_grad(set_to_none=True)
        loss.backward()
        gopt.step()
        if disc is not None:
            real, fake = wav2lip_train.disc_losses(disc, gt, g, ctx, args.amp)
            dopt.zero_grad(set_to_none=True)
            (real + fake).backward()
            dopt.step()

    t_gen = timed(generator_step, args.warmup, args.steps, dev)
    what = "generator+GAN" if args.gan else "generator"
    print(f"{what:13s} batch {b:3d}: {t_gen:7.3f} s/step  ({b / t_gen:7.1f} samples/s), sync loss on")
    return {"expert_s_per_step": t_expert, "generator_s_per_step": t_gen}


if __name__ == "__main__":
    main()

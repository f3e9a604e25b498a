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
ground truth) every `checkpoint_interval` steps. At a step that does both, the evaluation comes first, so
the checkpoint holds the sync-loss weight it decided and a resumed run goes on as the uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from common.atomic_files import atomic_path
from common.errors import run_cli
from common.flags import option
from common.weights import load_weights
from models import SyncNet_color, Wav2Lip, Wav2Lip_disc_qual, cosine_loss
from training import loop, run_folder
from training.datasets import SYNCNET_T, Wav2LipDataset

EVAL_STEPS = 700  # the original's batches per evaluation, cycling through its loader
EVAL_STEPS_GAN = 300  # hq_wav2lip_train.py's cap; it stopped after one pass (one window per val video)
SYNC_SWITCH_LOSS = 0.75  # the eval sync loss under which the sync loss is switched on
SYNC_WT_ON, SYNC_WT_ON_GAN = 0.01, 0.03


@dataclass(frozen=True, kw_only=True)
class GeneratorConfig(loop.TrainConfig):
    """Everything a run of the generator needs: the common flags and the generator's own."""

    syncnet_checkpoint_path: str = option(help="the trained expert (e.g. checkpoints/lipsync_expert.pth)")
    disc_checkpoint_path: str | None = option(None, "resume the discriminator from this (--gan)")
    gan: bool = option(False, "train with the visual-quality discriminator")
    expert_eval_mode: bool = option(False, "frozen expert in eval mode (default: train mode, as original)")


def build_parser(gan_default: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        prog="hq_wav2lip_train.py" if gan_default else "wav2lip_train.py",
    )
    loop.add_config_arguments(parser, GeneratorConfig)
    parser.set_defaults(gan=gan_default)
    return parser


def config_from_argv(argv: list[str] | None = None, gan_default: bool = False) -> GeneratorConfig:
    return loop.config_from_args(GeneratorConfig, build_parser(gan_default).parse_args(argv))


@dataclass
class SyncWeight:
    """The sync loss's weight over a run: `value` (the hparams' syncnet_wt, 0) until an eval sync loss
    falls below `threshold`, then `on` for good, as the original. The original kept it in its global
    hparams and lost it on resume; here it is state saved in every checkpoint and restored from it.
    """

    value: float
    on: float
    threshold: float = SYNC_SWITCH_LOSS

    def update(self, eval_sync_loss: float) -> float:
        """Switch on below the threshold; never lower the weight (nor one set higher with --hparams)."""
        if eval_sync_loss < self.threshold:
            self.value = max(self.value, self.on)
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass(frozen=True)
class GeneratorResult(loop.RunResult):
    """A finished generator run: the common result, the sync-loss weight reached and the discriminator."""

    syncnet_wt: float
    disc: Wav2Lip_disc_qual | None


def sync_loss(syncnet: nn.Module, mel: torch.Tensor, g: torch.Tensor, ctx: loop.Context, amp: str) -> torch.Tensor:
    """The expert's BCE of the generated window (B, 3, T, H, W) against "in sync": lower halves, frames on channels."""
    lower = g[:, :, :, g.size(3) // 2 :]
    frames = torch.cat([lower[:, :, i] for i in range(SYNCNET_T)], dim=1)
    with loop.autocast(ctx, amp):
        a, v = syncnet(mel, frames)
    return run_folder.finite_or_nan(cosine_loss, a.float(), v.float(), torch.ones(len(g), 1, device=g.device))


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """No parameter gradients inside (the input still gets its gradient)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def perceptual_loss(disc: nn.Module, g: torch.Tensor, ctx: loop.Context, amp: str) -> torch.Tensor:
    """`disc.perceptual_forward(g)` under autocast. The discriminator's own gradients are not needed for
    the generator's step (the original computed and then zeroed them), so its parameters are frozen and
    its DDP wrapper bypassed."""
    with frozen(loop.unwrap(disc)) as d, loop.autocast(ctx, amp):
        return d.perceptual_forward(g)


def disc_losses(
    disc: nn.Module, gt: torch.Tensor, g: torch.Tensor, ctx: loop.Context, amp: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE of the discriminator on real (label 1) and generated (label 0) frames, in one forward pass.

    The discriminator has no batch statistics, so one pass over both equals the original's two.
    """
    batch = len(gt)
    with loop.autocast(ctx, amp):
        pred = disc(torch.cat([gt, g.detach()]))
    pred = pred.float().view(gt.size(2), 2 * batch)  # rows are time-major: t * 2B + b
    real, fake = pred[:, :batch], pred[:, batch:]
    return F.binary_cross_entropy(real, torch.ones_like(real)), F.binary_cross_entropy(fake, torch.zeros_like(fake))


def save_sample_images(x: torch.Tensor, g: torch.Tensor, gt: torch.Tensor, step: int, folder: Path) -> None:
    """The original's collages: per sample and frame, reference | masked input | generated | ground truth."""

    def to_uint8(t: torch.Tensor) -> np.ndarray:
        return (t.detach().float().cpu().numpy().transpose(0, 2, 3, 4, 1) * 255.0).astype(np.uint8)

    x, g, gt = to_uint8(x), to_uint8(g), to_uint8(gt)
    collage = np.concatenate((x[..., 3:], x[..., :3], g, gt), axis=-2)
    out = folder / f"samples_step{step:09d}"
    for b, frames in enumerate(collage):
        for t, frame in enumerate(frames):
            with atomic_path(out / f"{b}_{t}.jpg") as tmp:
                cv2.imwrite(str(tmp), frame)


@dataclass
class Networks:
    """The generator (and with --gan the discriminator), their optimizers and scalers, and the frozen
    expert; `ddp_*` are the DDP-wrapped modules that the training steps call (the modules themselves
    under one process)."""

    model: Wav2Lip
    stepper: loop.Stepper
    syncnet: SyncNet_color
    disc: Wav2Lip_disc_qual | None
    disc_stepper: loop.Stepper | None
    ddp_model: nn.Module
    ddp_disc: nn.Module | None

    def scalars(self) -> dict[str, float]:
        """The generator's learning rate, and the steps the fp16 scaler skipped in both networks."""
        return self.stepper.scalars(self.stepper.skipped + (self.disc_stepper.skipped if self.disc_stepper else 0))


def build_networks(config: GeneratorConfig, ctx: loop.Context) -> tuple[Networks, SyncWeight, tuple[int, int]]:
    """The networks, resumed from the checkpoints given, with the sync-loss weight; and the (step,
    epoch) to start from."""
    hp = config.hparams
    syncnet = SyncNet_color().to(ctx.device)
    load_weights(syncnet, config.syncnet_checkpoint_path, "SyncNet_color", "--syncnet_checkpoint_path")
    syncnet.requires_grad_(False).train(not config.expert_eval_mode)

    model = Wav2Lip().to(ctx.device)
    betas = (0.5, 0.999) if config.gan else (0.9, 0.999)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], hp.initial_learning_rate, betas)
    sync_weight = SyncWeight(hp.syncnet_wt, SYNC_WT_ON_GAN if config.gan else SYNC_WT_ON, SYNC_SWITCH_LOSS)
    start = 0, 0
    if config.checkpoint_path:
        container = load_weights(model, config.checkpoint_path, "Wav2Lip", "--checkpoint_path")
        start = run_folder.resume(container, optimizer, config.checkpoint_path, hp)
        if "sync_weight" in container:
            sync_weight.load_state_dict(container["sync_weight"])
        elif "syncnet_wt" in container:  # the checkpoints of this project's first version
            sync_weight.load_state_dict({"value": container["syncnet_wt"]})
    disc = disc_optimizer = None
    if config.gan:
        disc = Wav2Lip_disc_qual().to(ctx.device)
        params = [p for p in disc.parameters() if p.requires_grad]
        disc_optimizer = torch.optim.Adam(params, hp.disc_initial_learning_rate, (0.5, 0.999))
        if config.disc_checkpoint_path:
            container = load_weights(disc, config.disc_checkpoint_path, "Wav2Lip_disc_qual", "--disc_checkpoint_path")
            run_folder.resume(container, disc_optimizer, config.disc_checkpoint_path, hp)
    ddp_disc = loop.wrap_ddp(disc, ctx) if disc is not None else None
    stepper = loop.Stepper(optimizer, loop.grad_scaler(ctx, config.amp))
    disc_stepper = loop.Stepper(disc_optimizer, loop.grad_scaler(ctx, config.amp)) if disc is not None else None
    nets = Networks(model, stepper, syncnet, disc, disc_stepper, loop.wrap_ddp(model, ctx), ddp_disc)
    return nets, sync_weight, start


def train_step(
    nets: Networks,
    batch: list[torch.Tensor],
    syncnet_wt: float,
    disc_wt: float,
    ctx: loop.Context,
    amp: str,
    check: Callable[[dict[str, float]], None] = lambda losses: None,
) -> tuple[dict[str, float], torch.Tensor]:
    """One step of the generator, then (--gan) one of the discriminator; returns the losses and the
    generated window. The sync loss is only computed while its weight is on, as the original. `check`
    sees each network's losses before its optimizer step (a NaN stops the run before reaching the weights)."""
    x, indiv_mels, mel, gt = batch
    with loop.autocast(ctx, amp):
        g = nets.ddp_model(indiv_mels, x)
    g = g.float()
    l1 = F.l1_loss(g, gt)
    zero = torch.zeros((), device=g.device)
    sync = sync_loss(nets.syncnet, mel, g, ctx, amp) if syncnet_wt > 0 else zero
    percep = perceptual_loss(nets.disc, g, ctx, amp) if disc_wt > 0 else zero
    loss = syncnet_wt * sync + disc_wt * percep + (1.0 - syncnet_wt - disc_wt) * l1
    losses = {"l1": l1.item(), "sync_loss": sync.item()} | (
        {"perceptual": percep.item()} if nets.disc is not None else {}
    )
    check(losses)
    nets.stepper.step(loss)
    if nets.disc is not None:  # the discriminator: real against generated
        real, fake = disc_losses(nets.ddp_disc, gt, g, ctx, amp)
        check(disc := {"disc_real": real.item(), "disc_fake": fake.item()})
        nets.disc_stepper.step(real + fake)
        losses |= disc
    return losses, g


def evaluate(nets: Networks, loader: DataLoader, ctx: loop.Context, amp: str, max_batches: int) -> dict[str, float]:
    """Mean eval losses over up to `max_batches` val batches per rank, averaged over all ranks."""
    modules = [m for m in (nets.model, nets.disc) if m is not None]
    for m in modules:
        m.eval()
    sums, count = {}, 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            x, indiv_mels, mel, gt = (t.to(ctx.device, non_blocking=True) for t in batch)
            with loop.autocast(ctx, amp):
                g = nets.model(indiv_mels, x)
            g = g.float()
            losses = {"l1": F.l1_loss(g, gt), "sync_loss": sync_loss(nets.syncnet, mel, g, ctx, amp)}
            if nets.disc is not None:
                losses["perceptual"] = perceptual_loss(nets.disc, g, ctx, amp)
                losses["disc_real"], losses["disc_fake"] = disc_losses(nets.disc, gt, g, ctx, amp)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(gt)
            count += len(gt)
    for m in modules:
        m.train()
    return loop.all_reduce_mean(sums, count, ctx)


def save(
    folder: Path, nets: Networks, step: int, epoch: int, config: GeneratorConfig, sync_weight: SyncWeight, good: Path
) -> Path:
    """The generator's checkpoint (with the sync-loss weight) and, with --gan, the discriminator's; `good`:
    the last good checkpoint, named if these weights diverged (and are not written)."""
    hp, keep = config.hparams, config.keep_last
    extra = {"sync_weight": sync_weight.state_dict(), "gan": config.gan}
    if nets.disc is not None:
        run_folder.save(folder, nets.disc, nets.disc_stepper.optimizer, step, epoch, hp, prefix="disc_",
                        keep_last=keep, last_good=good)  # fmt: skip
    return run_folder.save(folder, nets.model, nets.stepper.optimizer, step, epoch, hp, keep_last=keep,
                           last_good=good, **extra)  # fmt: skip


def train(config: GeneratorConfig) -> GeneratorResult:
    """The whole run, from the config to the last checkpoint; returns where it stopped."""
    hp, disc_wt = config.hparams, config.hparams.disc_wt if config.gan else 0.0
    with loop.session(config) as (ctx, folder):
        train_set, val_set = (Wav2LipDataset(config.data_root, s, config.filelists_dir, hp) for s in ("train", "val"))
        gan_eval = min(EVAL_STEPS_GAN, math.ceil(len(val_set.videos) / hp.batch_size))
        eval_steps = loop.eval_batches(config.eval_steps, gan_eval if config.gan else EVAL_STEPS, ctx)
        train_loader, val_loader = loop.loaders(train_set, val_set, hp.batch_size, ctx, config, 4)
        nets, sync_weight, start = build_networks(config, ctx)

        def step(batch: list[torch.Tensor], check: Callable[[dict[str, float]], None]) -> tuple:
            batch = [t.to(ctx.device, non_blocking=True) for t in batch]
            losses, g = train_step(nets, batch, sync_weight.value, disc_wt, ctx, config.amp, check)
            return losses, len(g), {"syncnet_wt": sync_weight.value, **nets.scalars()}, g

        def save_all(step: int, epoch: int, batch: list[torch.Tensor], g: torch.Tensor) -> Path:
            path = save(folder, nets, step, epoch, config, sync_weight, progress.good)
            save_sample_images(batch[0], g, batch[3], step, folder)
            return path

        progress = loop.Progress(*start, good=config.checkpoint_path)
        banner = (f"generator{' + GAN' if config.gan else ''}: {len(train_set)} train / {len(val_set)} val windows, "
                  f"{ctx.world_size} process(es) on {ctx.device}, from step {progress.step}, "
                  f"syncnet_wt {sync_weight.value}")  # fmt: skip
        with loop.Monitor(folder, ctx, config, banner, progress.step) as monitor:
            loop.run_loop(
                train_loader, progress, config.max_steps, ctx, monitor, folder=folder, train_step=step, save=save_all,
                evaluate=lambda: evaluate(nets, val_loader, ctx, config.amp, eval_steps),
                eval_due=lambda step: step == 1 or step % hp.eval_interval == 0,
                save_due=lambda step: step % hp.checkpoint_interval == 0,
                evaluated=lambda evaluation: {"syncnet_wt": sync_weight.update(evaluation["sync_loss"])},
            )  # fmt: skip
            result = GeneratorResult(progress.step, progress.epoch, progress.evaluation, progress.path, nets.model,
                                     sync_weight.value, nets.disc)  # fmt: skip
            monitor.finished(result)
        return result


def main(argv: list[str] | None = None, gan_default: bool = False) -> None:
    train(config_from_argv(argv, gan_default))


if __name__ == "__main__":
    run_cli(main)

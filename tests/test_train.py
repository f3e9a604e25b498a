"""The trainers train: on a synthetic LRS2-like dataset, on the CPU, with the tiny config.

The expert's eval loss must fall well below chance (ln 2 ≈ 0.693) and the generator's L1 must fall; then
the sync-loss weight's schedule and its resume, the GAN, DDP on two CPU processes and the one-line errors.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

import color_syncnet_train
import hq_wav2lip_train
import wav2lip_train
from common.errors import UserError
from common.weights import load_weights
from models import SyncNet_color, Wav2Lip, Wav2Lip_disc_qual
from tools.detweights import det_state_dict
from tools.make_synthetic_lrs2 import make_dataset
from training import loop, run_folder
from training.datasets import Wav2LipDataset, batch_indices
from training.loop import Context, RunResult
from wav2lip_train import SyncWeight

REPO = Path(__file__).resolve().parent.parent
TINY = f"@{REPO / 'configs' / 'tiny.txt'}"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    make_dataset(
        root, speakers=5, videos_per_speaker=2, seconds=3.0, seed=0, filelists_dir=root / "filelists", val_speakers=2
    )
    return root


def common(root: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["--data_root", str(root), "--filelists_dir", str(root / "filelists"), "--checkpoint_dir", str(ckpt),
            "--hparams", TINY, "--no_tqdm", "--num_workers", "0", *extra]  # fmt: skip


def generator_args(
    root: Path, ckpt: Path, expert: RunResult, max_steps: int, eval_steps: int, *extra: str
) -> list[str]:
    """`common` for a generator run: the frozen expert and the step counts every one of them gives."""
    return common(root, ckpt, "--syncnet_checkpoint_path", str(expert.checkpoint),
                  "--max_steps", str(max_steps), "--eval_steps", str(eval_steps), *extra)  # fmt: skip


def read_log(folder: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    with open(folder / "log.csv") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
    return out


@pytest.fixture(scope="module")
def expert(synth, tmp_path_factory) -> RunResult:
    """The learning proof's expert run: 120 steps of batch 16 (6 training clips of 3 s; 4 held out)."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ckpt = tmp_path_factory.mktemp("expert")
    argv = common(synth, ckpt, "--max_steps", "120", "--eval_steps", "18", "--neg_min_offset", "5", "--seed", "0")
    return color_syncnet_train.train(color_syncnet_train.config_from_argv(argv))


def test_config_is_typed_frozen_and_keeps_the_flags_defaults(tmp_path):
    argv = ["--data_root", "d", "--checkpoint_dir", "c", "--amp", "--hparams", "batch_size=3"]
    config = color_syncnet_train.config_from_argv(argv)
    assert (config.amp, config.hparams.batch_size, config.neg_min_offset) == ("bf16", 3, 0)
    assert (config.max_steps, config.keep_last, config.eval_steps, config.num_workers) == (None, 0, None, None)
    assert (config.device, config.seed, config.log_interval, config.no_tqdm) == ("auto", 0, 10, False)
    assert config.filelists_dir == "filelists" and config.workers == config.hparams.num_workers
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1
    generator = ["--data_root", "d", "--checkpoint_dir", "c", "--syncnet_checkpoint_path", "s"]
    assert not wav2lip_train.config_from_argv(generator).gan
    assert wav2lip_train.config_from_argv(generator, gan_default=True).gan  # hq_wav2lip_train.py's default
    with pytest.raises(SystemExit):  # a required flag is still required
        wav2lip_train.config_from_argv(["--data_root", "d", "--checkpoint_dir", "c"])


def test_expert_eval_loss_falls_below_chance(expert):
    log = read_log(expert.checkpoint.parent)
    print("expert eval loss by step:", log["eval/loss"])
    assert expert.step == 120
    # evals of 18 batches swing by ~0.07: the best one must be clearly below chance, the last one below it too
    best = min(v for _, v in log["eval/loss"])
    assert best <= 0.5, f"eval loss {log['eval/loss']} never fell below 0.5 (ln 2 = 0.693)"
    assert expert.eval["loss"] <= 0.6, f"final eval loss {expert.eval['loss']:.3f} is back near chance"


def test_expert_checkpoint_is_the_original_container_and_safe_to_load(expert):
    c = torch.load(expert.checkpoint, map_location="cpu", weights_only=True)
    assert {"state_dict", "optimizer", "global_step", "global_epoch", "hparams", "rng_states"} <= set(c)
    assert c["global_step"] == 120 and c["hparams"]["syncnet_batch_size"] == 16
    load_weights(SyncNet_color(), expert.checkpoint, "SyncNet_color")
    folder = expert.checkpoint.parent
    assert (folder / "tensorboard").is_dir()
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/loss"} <= set(read_log(folder))
    options = (folder / "run_options.txt").read_text().splitlines()
    assert "--neg_min_offset 5" in options and "syncnet_batch_size=16" in options


def test_generator_l1_falls_and_sync_loss_switches_on(synth, expert, tmp_path):
    ckpt = tmp_path / "gen"
    result = wav2lip_train.train(
        wav2lip_train.config_from_argv(generator_args(synth, ckpt, expert, 10, 4, "--log_interval", "1"))
    )
    log = read_log(ckpt)
    train_l1 = [v for _, v in log["train/l1"]]
    print("generator train L1 by step:", train_l1, "eval:", log["eval/l1"], "sync:", log["eval/sync_loss"])
    assert len(train_l1) == 10 and [s for s, _ in log["eval/l1"]] == [1, 10]
    # batches of 2 are noisy: the trend over the 10 steps and its ends must both fall. (The eval L1 is
    # printed, not asserted: after 10 steps the BatchNorm running statistics used in eval mode lag far
    # behind the weights, so it can still rise.)
    first, last = sum(train_l1[:2]) / 2, sum(train_l1[-3:]) / 3
    slope = np.polyfit(np.arange(len(train_l1)), train_l1, 1)[0]
    assert last < first and slope < 0, f"training L1 did not fall: {train_l1}"
    # the expert's eval sync loss decides the weight, either way; it is recorded in the checkpoint
    switched = any(v < 0.75 for _, v in log["eval/sync_loss"])
    assert result.syncnet_wt == (0.01 if switched else 0.0)
    c = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert c["sync_weight"] == {"value": result.syncnet_wt}
    samples = sorted((ckpt).glob("samples_step*"))
    assert samples and (samples[-1] / "0_0.jpg").is_file()


def test_sync_weight_switches_on_below_the_threshold_for_good():
    weight = SyncWeight(0.0, on=0.01)  # the original's threshold, 0.75
    assert weight.update(0.80) == 0.0 and weight.value == 0.0
    assert weight.update(0.75) == 0.0  # strictly below
    assert weight.update(0.74) == 0.01
    assert weight.update(0.90) == 0.01 and weight.value == 0.01  # never switched back
    assert SyncWeight(0.05, on=0.03).update(0.1) == 0.05  # a higher weight from --hparams is kept


def test_sync_weight_state_round_trips_through_a_checkpoint(tmp_path):
    weight = SyncWeight(0.0, on=0.03)
    weight.update(0.5)
    torch.save({"sync_weight": weight.state_dict()}, tmp_path / "c.pth")
    restored = SyncWeight(0.0, on=0.03)
    restored.load_state_dict(torch.load(tmp_path / "c.pth", weights_only=True)["sync_weight"])
    assert restored == weight and restored.value == 0.03
    assert restored.update(0.9) == 0.03


def test_resume_restores_the_switched_on_sync_weight(synth, expert, tmp_path, monkeypatch):
    # the first run switches the weight on at its step-1 evaluation, whatever the loss
    monkeypatch.setattr(wav2lip_train, "SYNC_SWITCH_LOSS", float("inf"))
    first = wav2lip_train.train(wav2lip_train.config_from_argv(generator_args(synth, tmp_path / "a", expert, 1, 1)))
    assert first.syncnet_wt == 0.01
    c = torch.load(first.checkpoint, weights_only=True)
    assert c["sync_weight"] == {"value": 0.01} and c["global_step"] == 1
    # the resumed run could never switch it on itself: it has the weight from the checkpoint, and uses it
    monkeypatch.setattr(wav2lip_train, "SYNC_SWITCH_LOSS", float("-inf"))
    argv = generator_args(synth, tmp_path / "b", expert, 2, 1, "--checkpoint_path", str(first.checkpoint),
                          "--keep_last", "1", "--log_interval", "1")  # fmt: skip
    result = wav2lip_train.train(wav2lip_train.config_from_argv(argv))
    assert result.step == 2 and result.syncnet_wt == 0.01
    log = read_log(tmp_path / "b")
    assert log["train/syncnet_wt"][0] == (2, 0.01) and log["train/sync_loss"][0][1] > 0
    assert [p.name for p in (tmp_path / "b").glob("checkpoint_step*.pth")] == ["checkpoint_step000000002.pth"]


def test_perceptual_loss_is_the_discriminators_under_frozen_weights(monkeypatch):
    torch.manual_seed(0)
    disc, ctx = Wav2Lip_disc_qual(), Context(0, 1, torch.device("cpu"))
    g = torch.rand(1, 3, 5, 96, 96, requires_grad=True)
    loss = wav2lip_train.perceptual_loss(disc, g, ctx, "off")
    assert torch.equal(loss, disc.perceptual_forward(g))
    loss.backward()
    assert g.grad is not None and g.grad.abs().sum() > 0  # the generator learns from it
    assert all(p.grad is None and p.requires_grad for p in disc.parameters())  # the discriminator does not
    monkeypatch.setattr(Wav2Lip_disc_qual, "perceptual_forward", lambda self, x: torch.tensor(-1.0))
    assert wav2lip_train.perceptual_loss(disc, g, ctx, "off") == -1.0  # one definition: the model's


def test_gan_alias_trains_the_discriminator(synth, expert, tmp_path):
    ckpt = tmp_path / "hq"
    assert hq_wav2lip_train.main(generator_args(synth, ckpt, expert, 2, 1, "--expert_eval_mode")) is None
    load_weights(Wav2Lip(), ckpt / "checkpoint_step000000002.pth", "Wav2Lip")
    load_weights(Wav2Lip_disc_qual(), ckpt / "disc_checkpoint_step000000002.pth", "Wav2Lip_disc_qual")
    log = read_log(ckpt)
    assert {"eval/perceptual", "eval/disc_real", "eval/disc_fake"} <= set(log)
    # resume both networks
    hq_wav2lip_train.main(
        generator_args(
            synth,
            tmp_path / "hq2",
            expert,
            3,
            1,
            "--checkpoint_path",
            str(ckpt / "checkpoint_step000000002.pth"),
            "--disc_checkpoint_path",
            str(ckpt / "disc_checkpoint_step000000002.pth"),
        )
    )
    for name in ("checkpoint_step000000003.pth", "disc_checkpoint_step000000003.pth"):
        assert torch.load(tmp_path / "hq2" / name, weights_only=True)["global_step"] == 3


# --- DDP on two CPU processes ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    result = color_syncnet_train.train(color_syncnet_train.config_from_argv(argv))
    params = {k: v for k, v in result.model.named_parameters()}
    torch.save({"params": params, "eval_loss": result.eval["loss"]}, Path(out) / f"rank{rank}.pt")


def test_ddp_two_cpu_processes_keep_identical_weights(synth, tmp_path):
    argv = common(synth, tmp_path / "ddp", "--max_steps", "3", "--eval_steps", "1",
                  "--hparams", "syncnet_batch_size=4,num_workers=0")  # fmt: skip
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert r0["eval_loss"] == r1["eval_loss"]  # all-reduced
    initial = SyncNet_color()
    assert any(not torch.equal(p, r0["params"][n]) for n, p in initial.named_parameters())
    assert (tmp_path / "ddp" / "checkpoint_step000000003.pth").is_file()


# --- one-line errors ---------------------------------------------------------------------------------------


def test_missing_data_root(tmp_path):
    with pytest.raises(UserError, match="data root not found"):
        color_syncnet_train.main(common(tmp_path / "nope", tmp_path / "c", "--max_steps", "1"))


def test_wrong_model_checkpoint(synth, expert, tmp_path):
    with pytest.raises(UserError, match="SyncNet_color checkpoint; --checkpoint_path expects Wav2Lip"):
        wav2lip_train.main(
            common(
                synth,
                tmp_path / "c",
                "--syncnet_checkpoint_path",
                str(expert.checkpoint),
                "--checkpoint_path",
                str(expert.checkpoint),
                "--max_steps",
                "1",
            )  # fmt: skip
        )


def test_expert_path_must_be_an_expert(synth, tmp_path):
    w = tmp_path / "w.pth"
    torch.save({"state_dict": Wav2Lip().state_dict()}, w)
    with pytest.raises(UserError, match="--syncnet_checkpoint_path expects SyncNet_color"):
        wav2lip_train.main(common(synth, tmp_path / "c", "--syncnet_checkpoint_path", str(w), "--max_steps", "1"))


def test_unwritable_checkpoint_dir(synth, tmp_path):
    """A folder no one can create, root included (CI runs as root, who may write in a read-only folder): one
    under a regular file."""
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.raises(UserError, match="choose another --checkpoint_dir"):
        color_syncnet_train.main(common(synth, blocker / "runs" / "ckpt", "--max_steps", "1"))


def test_checkpoint_dir_that_is_a_file(synth, tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(UserError, match="choose another --checkpoint_dir"):
        color_syncnet_train.main(common(synth, f, "--max_steps", "1"))


# --- small data: no batch of one, and any failure in one line ------------------------------------------------


def test_no_batch_holds_a_single_sample():
    assert batch_indices(range(7), 2, drop_last=False) == [[0, 1], [2, 3], [4, 5, 6]]  # the last one joins
    assert batch_indices(range(7), 2, drop_last=True) == [[0, 1], [2, 3], [4, 5]]  # the original's training
    assert batch_indices(range(17), 16, drop_last=True) == [list(range(16))]
    assert batch_indices(range(5), 16, drop_last=True) == [list(range(5))]  # nothing full to keep instead
    assert batch_indices([3], 2, drop_last=False) == [[3, 3]]  # alone: taken twice, every mean unchanged
    assert batch_indices([], 2, drop_last=False) == []


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_no_loader_yields_a_batch_of_one_in_any_shard(world_size):
    """7 windows in batches of 2: the last batch of an epoch, of a val split, and of each DDP shard."""
    for n, drop_last in ((7, False), (7, True), (3, True), (1, False)):
        for rank in range(world_size):
            ctx = Context(rank, world_size, torch.device("cpu"))
            data = [torch.zeros(1)] * n
            loader = loop.make_loader(data, 2, ctx, shuffle=True, num_workers=0, seed=0, drop_last=drop_last)
            sizes = [len(batch) for batch in loader]
            assert sizes and min(sizes) >= 2 and len(loader) == len(sizes), (n, drop_last, rank, sizes)


def test_an_evaluation_whose_last_batch_holds_one_window_runs(synth, tmp_path):
    """The step-1 evaluation that crashed: the frozen expert's BatchNorm in train mode, a last batch of one."""
    expert = tmp_path / "expert.pth"
    torch.save({"state_dict": det_state_dict("SyncNet_color")}, expert)
    config = wav2lip_train.config_from_argv(common(synth, tmp_path / "c", "--syncnet_checkpoint_path", str(expert)))
    ctx = Context(0, 1, torch.device("cpu"))
    nets, _, _ = wav2lip_train.build_networks(config, ctx)
    val = Subset(Wav2LipDataset(synth, "val", synth / "filelists", config.hparams), range(3))
    loader = loop.make_loader(val, 2, ctx, shuffle=True, num_workers=0, seed=1, drop_last=False)
    result = wav2lip_train.evaluate(nets, loader, ctx, "off", wav2lip_train.EVAL_STEPS)
    assert set(result) == {"l1", "sync_loss"} and all(math.isfinite(v) for v in result.values())


def test_a_batch_size_of_one_is_one_line(synth, tmp_path):
    with pytest.raises(UserError, match=r"^syncnet_batch_size=1: batches need at least 2 samples"):
        color_syncnet_train.main(common(synth, tmp_path / "c", "--max_steps", "1", "--hparams", "syncnet_batch_size=1"))


def test_an_unexpected_error_is_one_line_naming_the_step_with_the_traceback_kept(synth, tmp_path, monkeypatch):
    loss_of = color_syncnet_train.loss_of
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("Expected more than 1 value per channel\nsecond line")
        return loss_of(*args, **kwargs)

    monkeypatch.setattr(color_syncnet_train, "loss_of", failing)
    folder = tmp_path / "c"
    argv = common(synth, folder, "--max_steps", "5", "--hparams", "syncnet_batch_size=2")
    with pytest.raises(run_folder.TrainingError) as e:
        color_syncnet_train.main(argv)
    log = folder / "crash.log"
    assert str(e.value) == (
        "step 3: training stopped by an unexpected error (ValueError: Expected more than 1 value per channel); "
        f"the traceback is in {log}"
    )
    assert e.value.__cause__ is None and e.value.__suppress_context__  # run_cli prints the one line
    text = log.read_text()
    assert text.startswith("step 3\nTraceback") and "second line" in text and "in failing" in text
    # before any step (the networks, the data): named as such
    monkeypatch.setattr(color_syncnet_train, "SyncNet_color", lambda: 1 / 0)
    with pytest.raises(run_folder.TrainingError, match=r"^while setting up the run: .*\(ZeroDivisionError: division"):
        color_syncnet_train.main(argv)

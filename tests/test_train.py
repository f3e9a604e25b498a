"""The trainers train: on a synthetic LRS2-like dataset, on the CPU, with the tiny config.

The expert's eval loss must fall well below chance (ln 2 ≈ 0.693) and the generator's L1 must fall; then
resume, the GAN, DDP on two CPU processes and the one-line errors.
"""

from __future__ import annotations

import csv
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import color_syncnet_train
import hq_wav2lip_train
import wav2lip_train
from checkpoints import load_weights
from errors import UserError
from models import SyncNet_color, Wav2Lip, Wav2Lip_disc_qual
from tools.make_synthetic_lrs2 import make_dataset

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


def generator_args(root: Path, ckpt: Path, expert: dict, max_steps: int, eval_steps: int, *extra: str) -> list[str]:
    """`common` for a generator run: the frozen expert and the step counts every one of them gives."""
    return common(root, ckpt, "--syncnet_checkpoint_path", str(expert["checkpoint"]),
                  "--max_steps", str(max_steps), "--eval_steps", str(eval_steps), *extra)  # fmt: skip


def read_log(folder: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    with open(folder / "log.csv") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
    return out


@pytest.fixture(scope="module")
def expert(synth, tmp_path_factory) -> dict:
    """The learning proof's expert run: 120 steps of batch 16 (6 training clips of 3 s; 4 held out)."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ckpt = tmp_path_factory.mktemp("expert")
    result = color_syncnet_train.main(
        common(synth, ckpt, "--max_steps", "120", "--eval_steps", "18", "--neg_min_offset", "5", "--seed", "0")
    )
    result["dir"] = ckpt
    return result


def test_expert_eval_loss_falls_below_chance(expert):
    log = read_log(expert["dir"])
    print("expert eval loss by step:", log["eval/loss"])
    assert expert["step"] == 120
    # evals of 18 batches swing by ~0.07: the best one must be clearly below chance, the last one below it too
    best = min(v for _, v in log["eval/loss"])
    assert best <= 0.5, f"eval loss {log['eval/loss']} never fell below 0.5 (ln 2 = 0.693)"
    assert expert["eval_loss"] <= 0.6, f"final eval loss {expert['eval_loss']:.3f} is back near chance"


def test_expert_checkpoint_is_the_original_container_and_safe_to_load(expert):
    c = torch.load(expert["checkpoint"], map_location="cpu", weights_only=True)
    assert {"state_dict", "optimizer", "global_step", "global_epoch", "hparams", "rng_states"} <= set(c)
    assert c["global_step"] == 120 and c["hparams"]["syncnet_batch_size"] == 16
    load_weights(SyncNet_color(), expert["checkpoint"], "SyncNet_color")
    assert (expert["dir"] / "tensorboard").is_dir()
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/loss"} <= set(read_log(expert["dir"]))


def test_generator_l1_falls_and_sync_loss_switches_on(synth, expert, tmp_path):
    ckpt = tmp_path / "gen"
    result = wav2lip_train.main(generator_args(synth, ckpt, expert, 10, 4, "--log_interval", "1"))
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
    # the expert's eval sync loss decides the weight; it is recorded in the checkpoint
    c = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert c["syncnet_wt"] == result["syncnet_wt"]
    if log["eval/sync_loss"][0][1] < 0.75:
        assert result["syncnet_wt"] == 0.01
    samples = sorted((ckpt).glob("samples_step*"))
    assert samples and (samples[-1] / "0_0.jpg").is_file()


def test_resume_restores_syncnet_wt_and_step(synth, expert, tmp_path):
    first = tmp_path / "a"
    wav2lip_train.main(generator_args(synth, first, expert, 1, 1))
    path = first / "checkpoint_step000000001.pth"
    c = torch.load(path, weights_only=True)
    c["syncnet_wt"] = 0.02  # a weight the schedule never sets by itself
    torch.save(c, path)
    result = wav2lip_train.main(
        generator_args(synth, tmp_path / "b", expert, 2, 1, "--checkpoint_path", str(path), "--keep_last", "1")
    )
    assert result["step"] == 2 and result["syncnet_wt"] == 0.02
    assert [p.name for p in (tmp_path / "b").glob("checkpoint_step*.pth")] == ["checkpoint_step000000002.pth"]


def test_gan_alias_trains_the_discriminator(synth, expert, tmp_path):
    ckpt = tmp_path / "hq"
    result = hq_wav2lip_train.main(generator_args(synth, ckpt, expert, 2, 1, "--expert_eval_mode"))
    assert result["disc"] is not None
    load_weights(Wav2Lip(), ckpt / "checkpoint_step000000002.pth", "Wav2Lip")
    load_weights(Wav2Lip_disc_qual(), ckpt / "disc_checkpoint_step000000002.pth", "Wav2Lip_disc_qual")
    log = read_log(ckpt)
    assert {"eval/perceptual", "eval/disc_real", "eval/disc_fake"} <= set(log)
    # resume both networks
    result = hq_wav2lip_train.main(
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
    assert result["step"] == 3


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
    result = color_syncnet_train.main(argv)
    params = {k: v for k, v in result["model"].named_parameters()}
    torch.save({"params": params, "eval_loss": result["eval_loss"]}, Path(out) / f"rank{rank}.pt")


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
                str(expert["checkpoint"]),
                "--checkpoint_path",
                str(expert["checkpoint"]),
                "--max_steps",
                "1",
            )  # fmt: skip
        )


def test_expert_path_must_be_an_expert(synth, tmp_path):
    w = tmp_path / "w.pth"
    torch.save({"state_dict": Wav2Lip().state_dict()}, w)
    with pytest.raises(UserError, match="--syncnet_checkpoint_path expects SyncNet_color"):
        wav2lip_train.main(common(synth, tmp_path / "c", "--syncnet_checkpoint_path", str(w), "--max_steps", "1"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_checkpoint_dir(synth, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(UserError, match="--checkpoint_dir cannot be written"):
        color_syncnet_train.main(common(synth, ro / "ckpt", "--max_steps", "1"))


def test_checkpoint_dir_that_is_a_file(synth, tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(UserError, match="--checkpoint_dir cannot be written"):
        color_syncnet_train.main(common(synth, f, "--max_steps", "1"))

"""Issue 14: SIGKILL at (seeded) random moments, several times, then rerun: preprocess.py and both trainers.

The runs are forked from the test process (torch is imported once), killed with SIGKILL, and rerun the
way a user reruns them. Checkpoint writing is slowed down in the child (`slow_torch_save`: half the bytes,
a pause, the rest), so that some kills land in the middle of a write.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import color_syncnet_train
import preprocess
import wav2lip_train
from common.weights import load_weights
from models import SyncNet_color, Wav2Lip
from tests.test_preprocess import FakeDetector
from tools.detweights import det_state_dict
from tools.make_synthetic_lrs2 import make_dataset
from training import run_folder

REPO = Path(__file__).resolve().parent.parent
SLOW_WRITE = 0.4  # seconds a checkpoint write stays half-written in the child
CHECKPOINT_PARTIAL = ".checkpoint_step*.partial-*"  # not run_options.txt's, which is written in a blink
FORK = multiprocessing.get_context("fork")
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def slow_torch_save() -> None:
    """In the child: every torch.save writes half its bytes, pauses, then writes the rest."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(f, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            time.sleep(SLOW_WRITE)
            out.write(data[len(data) // 2 :])

    torch.save = save


def _child(main: Callable, argv: list, slow: bool) -> None:
    torch.set_num_threads(1)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the child ends with the process
    if slow:
        slow_torch_save()
    main(argv)


def start(main: Callable, argv: list, slow: bool = True) -> multiprocessing.Process:
    p = FORK.Process(target=_child, args=(main, argv, slow), daemon=True)
    p.start()
    return p


def kill_at(p: multiprocessing.Process, folder: Path, moment: float | str, timeout: float = 60) -> None:
    """SIGKILL `p` after `moment` seconds, or (moment "write") while a checkpoint is half-written."""
    if moment == "write":
        deadline = time.time() + timeout
        while not list(folder.glob(CHECKPOINT_PARTIAL)) and p.is_alive() and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(SLOW_WRITE / 4)
    else:
        time.sleep(moment)
    os.kill(p.pid, signal.SIGKILL)
    p.join()


def every_checkpoint_is_whole(folder: Path, arch: str, model: Callable[[], torch.nn.Module]) -> None:
    for path in folder.glob("checkpoint_step*.pth"):
        container = load_weights(model(), path, arch)
        assert container["global_step"] == int(path.stem.removeprefix("checkpoint_step")), path


def kill_and_resume(main: Callable, argv: list, folder: Path, moments: list, arch: str, model, max_steps: int) -> dict:
    """Run, kill at each moment, resume from the newest whole checkpoint; then a run to the end."""
    folder.mkdir(parents=True, exist_ok=True)
    killed_during_write = 0
    for moment in [*moments, None]:
        latest = run_folder.latest_checkpoint(folder)
        resume = ["--checkpoint_path", str(latest)] if latest else []
        p = start(main, [*argv, *resume], slow=moment is not None)
        if moment is None:
            p.join(300)
            assert p.exitcode == 0
            break
        kill_at(p, folder, moment)
        killed_during_write += bool(list(folder.glob(CHECKPOINT_PARTIAL)))
        every_checkpoint_is_whole(folder, arch, model)
    assert killed_during_write >= 1, "no kill landed in a checkpoint write"
    assert not list(folder.glob(".*partial*")), "a partial file was left in the checkpoint folder"
    every_checkpoint_is_whole(folder, arch, model)
    final = torch.load(run_folder.latest_checkpoint(folder), weights_only=True)
    assert final["global_step"] == max_steps and final["optimizer"]["state"] and final["rng_states"]
    return final


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill_synth")
    make_dataset(root, speakers=2, videos_per_speaker=1, seconds=1.2, seed=0, filelists_dir=root / "filelists")
    return root


def trainer_args(root: Path, folder: Path, max_steps: int, *extra: str) -> list[str]:
    return ["--data_root", str(root), "--filelists_dir", str(root / "filelists"), "--checkpoint_dir", str(folder),
            "--no_tqdm", "--num_workers", "0", "--eval_steps", "1", "--max_steps", str(max_steps),
            "--log_interval", "1", *extra]  # fmt: skip


def test_expert_killed_at_random_moments_resumes(synth, tmp_path):
    rng = random.Random(14)
    moments = ["write", rng.uniform(0.5, 4.0), "write", rng.uniform(0.5, 4.0)]
    hp = "syncnet_batch_size=2,syncnet_checkpoint_interval=1,syncnet_eval_interval=1000"
    argv = trainer_args(synth, tmp_path / "c", 6, "--hparams", hp)
    kill_and_resume(color_syncnet_train.main, argv, tmp_path / "c", moments, "SyncNet_color", SyncNet_color, 6)


def test_generator_killed_at_random_moments_resumes(synth, tmp_path):
    expert = tmp_path / "expert.pth"
    torch.save({"state_dict": det_state_dict("SyncNet_color")}, expert)
    rng = random.Random(15)
    moments = ["write", rng.uniform(0.5, 4.0)]
    hp = "batch_size=2,checkpoint_interval=1,eval_interval=1000,syncnet_wt=0.01"
    argv = trainer_args(synth, tmp_path / "g", 3, "--hparams", hp, "--syncnet_checkpoint_path", str(expert))
    final = kill_and_resume(wav2lip_train.main, argv, tmp_path / "g", moments, "Wav2Lip", Wav2Lip, 3)
    assert final["sync_weight"] == {"value": 0.01}


class SlowDetector(FakeDetector):
    """The fake S3FD, slow enough that a kill lands in the middle of a video."""

    def get_detections_for_batch(self, frames: np.ndarray):
        time.sleep(0.05)
        return super().get_detections_for_batch(frames)


def _preprocess_child(argv: list[str]) -> None:
    preprocess.main(argv, detector_factory=lambda device: SlowDetector())


def complete_folders(out: Path) -> dict[str, float]:
    """Every visible video folder (what a trainer reads) must be whole: crops, audio.wav and mel.npy."""
    found = {}
    for folder in out.glob("*/*"):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        assert (folder / "audio.wav").is_file() and (folder / "mel.npy").is_file(), folder
        assert len(list(folder.glob("*.jpg"))) == 25, folder  # 1 s at 25 fps, a face in every frame
        found[f"{folder.parent.name}/{folder.name}"] = (folder / "mel.npy").stat().st_mtime_ns
    return found


def test_preprocess_killed_at_random_moments_resumes(tmp_path):
    raw = tmp_path / "raw"
    make_dataset(raw, layout="raw", speakers=2, videos_per_speaker=3, seconds=1.0, seed=5)
    out = tmp_path / "out"
    argv = ["--data_root", str(raw), "--preprocessed_root", str(out), "--no_tqdm", "--batch_size", "4"]
    rng = random.Random(16)
    finished: dict[str, float] = {}
    for _ in range(4):
        p = FORK.Process(target=_preprocess_child, args=(argv,), daemon=True)
        p.start()
        time.sleep(rng.uniform(0.3, 2.0))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        now = complete_folders(out)
        assert finished.items() <= now.items()  # nothing finished was redone
        finished = now
    report = preprocess.main(argv, detector_factory=lambda device: SlowDetector())
    assert report["failed"] == 0 and report["skipped"] == len(finished)
    assert report["done"] == 6 - len(finished)  # only what was not finished: at most the video in flight each time
    done = complete_folders(out)
    assert len(done) == 6 and {k: done[k] for k in finished} == finished
    assert not [p for p in out.glob("*/.*")], "a temporary folder was left"

"""preprocess.py on raw synthetic videos, with a fake detector standing in for S3FD."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

import preprocess
from common.errors import UserError
from tools.make_synthetic_lrs2 import FACE_BOX, make_clip, make_dataset, write_mp4
from training import datasets


class FakeDetector:
    """The drawn face's box on every frame, except frames listed in `missing` (counted over all calls)."""

    def __init__(self, missing: set[int] = frozenset()):
        self.missing, self.seen = missing, 0

    def get_detections_for_batch(self, frames: np.ndarray):
        assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8
        boxes = []
        for _ in frames:
            boxes.append(None if self.seen in self.missing else FACE_BOX)
            self.seen += 1
        return boxes


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    make_dataset(root, layout="raw", speakers=3, videos_per_speaker=1, seconds=1.2, seed=3)
    return root


def test_preprocess_writes_the_layout_and_is_resumable(raw, tmp_path):
    out = tmp_path / "pre"
    report = preprocess.main(
        ["--data_root", str(raw), "--preprocessed_root", str(out), "--no_tqdm", "--filelist_out",
         str(tmp_path / "filelists"), "--val_fraction", "0.3"],
        detector_factory=lambda device: FakeDetector(),
    )  # fmt: skip
    assert report["done"] == 3 and report["failed"] == 0
    folder = out / "spk00" / "00000"
    jpgs = sorted(folder.glob("*.jpg"), key=lambda p: datasets.frame_id(p.name))
    assert [datasets.frame_id(p.name) for p in jpgs] == list(range(30))  # 1.2 s at 25 fps
    x1, y1, x2, y2 = FACE_BOX
    import cv2

    assert cv2.imread(str(jpgs[0])).shape == (y2 - y1, x2 - x1, 3)  # the box as detected, no padding
    rate, pcm = wavfile.read(folder / "audio.wav")
    assert rate == 16000 and pcm.dtype == np.int16 and pcm.ndim == 1
    mel = np.load(folder / "mel.npy")
    np.testing.assert_array_equal(mel, datasets.compute_mel(folder / "audio.wav"))
    assert json.loads((out / "preprocess_report.json").read_text())["done"] == 3
    # filelists split by speaker
    train = (tmp_path / "filelists" / "train.txt").read_text().split()
    val = (tmp_path / "filelists" / "val.txt").read_text().split()
    assert len(train) + len(val) == 3 and val and train
    assert not {e.split("/")[0] for e in train} & {e.split("/")[0] for e in val}
    # the trainers read it as is
    assert len(datasets.SyncDataset(out, "train", tmp_path / "filelists")) > 0
    # a rerun skips what is done
    report = preprocess.main(
        ["--data_root", str(raw), "--preprocessed_root", str(out), "--no_tqdm"],
        detector_factory=lambda device: FakeDetector(),
    )
    assert report["skipped"] == 3 and report["done"] == 0


def test_missed_faces_leave_gaps_named_by_frame_index(raw, tmp_path):
    vfile = raw / "spk00" / "00000.mp4"
    outcome = preprocess.process_video(vfile, tmp_path, FakeDetector(missing={3, 4}), batch_size=8)
    assert outcome.status == "done" and outcome.faces == outcome.frames - 2
    names = {datasets.frame_id(p.name) for p in (tmp_path / "spk00" / "00000").glob("*.jpg")}
    assert 3 not in names and 4 not in names and {2, 5, 29} <= names


def test_other_frame_rates_are_resampled_to_hparams_fps(tmp_path):
    clip = make_clip(30, np.random.default_rng(0), (120, 150, 200))  # 30 frames…
    vfile = tmp_path / "in" / "spk" / "v.mp4"
    write_mp4(vfile, clip.frames, clip.wav, fps=50)  # …at 50 fps: 0.6 s
    outcome = preprocess.process_video(vfile, tmp_path / "out", FakeDetector())
    assert outcome.status == "done" and outcome.frames == 15  # hp.fps = 25
    report = preprocess.main(
        ["--data_root", str(tmp_path / "in"), "--preprocessed_root", str(tmp_path / "out10"), "--no_tqdm",
         "--hparams", "fps=10"],
        detector_factory=lambda device: FakeDetector(),
    )  # fmt: skip
    assert report["outcomes"][0]["frames"] == 6  # 0.6 s at --hparams fps=10


def test_failures_are_reported_not_fatal(raw, tmp_path):
    broken = tmp_path / "in"
    (broken / "spkX").mkdir(parents=True)
    (broken / "spkX" / "bad.mp4").write_bytes(b"not a video")
    (broken / "spkY").mkdir()
    (broken / "spkY" / "ok.mp4").write_bytes((raw / "spk00" / "00000.mp4").read_bytes())
    out = tmp_path / "out"
    report = preprocess.main(
        ["--data_root", str(broken), "--preprocessed_root", str(out), "--no_tqdm"],
        detector_factory=lambda device: FakeDetector(),
    )
    assert report["done"] == 1 and report["failed"] == 1
    (failure,) = json.loads((out / "preprocess_report.json").read_text())["failures"]
    assert failure["video"] == "spkX/bad" and failure["reason"]
    assert not (out / "spkX" / "bad").exists() and not list((out / "spkX").glob(".*"))


def test_no_face_is_a_failure(raw, tmp_path):
    outcome = preprocess.process_video(raw / "spk01" / "00000.mp4", tmp_path, FakeDetector(missing=set(range(99))))
    assert outcome.status == "failed" and "no face" in outcome.reason
    assert not (tmp_path / "spk01" / "00000").exists()


def test_torchrun_ranks_take_disjoint_shards(raw, tmp_path, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        report = preprocess.main(
            ["--data_root", str(raw), "--preprocessed_root", str(tmp_path), "--no_tqdm"],
            detector_factory=lambda device: FakeDetector(),
        )
        seen.append({o["video"] for o in report["outcomes"]})
        assert (tmp_path / f"preprocess_report.rank{rank}.json").is_file()
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 3


def test_missing_data_root(tmp_path):
    with pytest.raises(UserError, match="--data_root not found"):
        preprocess.main(["--data_root", str(tmp_path / "nope"), "--preprocessed_root", str(tmp_path / "o")])


def test_stale_temp_folders_are_cleaned(raw, tmp_path):
    stale = tmp_path / "spk02" / ".00000.tmp-99999"
    stale.mkdir(parents=True)
    (stale / "0.jpg").write_bytes(b"")
    preprocess.process_video(raw / "spk02" / "00000.mp4", tmp_path, FakeDetector())
    assert not stale.exists() and (tmp_path / "spk02" / "00000" / "audio.wav").is_file()


def test_missing_detector_weights(raw, tmp_path):
    with pytest.raises(UserError, match="none.pth: file not found.*--detector_path"):
        preprocess.main(["--data_root", str(raw), "--preprocessed_root", str(tmp_path / "o"),
                         "--detector_path", str(tmp_path / "none.pth")])  # fmt: skip

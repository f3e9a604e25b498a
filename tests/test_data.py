"""datasets.py keeps the original's windows and speech alignment, and reads each clip's mel once."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import audio
from common.errors import UserError
from hparams import hparams
from tools.make_synthetic_lrs2 import make_dataset
from training import datasets


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_data")
    make_dataset(root, speakers=2, videos_per_speaker=2, seconds=2.0, seed=1, filelists_dir=root / "filelists")
    return root


@pytest.fixture
def copy(synth, tmp_path) -> Path:
    """A private copy of the dataset, without mel caches."""
    root = tmp_path / "ds"
    shutil.copytree(synth, root, ignore=shutil.ignore_patterns("mel*.npy"))
    return root


def test_windows_count_and_len(copy):
    ds = datasets.SyncDataset(copy, "train", copy / "filelists")
    # 2 s at 25 fps = 50 frames → 46 windows of 5; the last windows' speech must fit in 161 mel columns
    assert len(ds) == sum(len(v.starts) for v in ds.videos)
    assert all(len(v.frame_windows) == 46 for v in ds.videos)
    n_mel = datasets.load_mel(ds.videos[0].folder).shape[1]
    assert n_mel == 1 + 32000 // 200
    for v in ds.videos:
        last = int(v.starts[-1])
        assert datasets.mel_start(last, 25) + 16 <= n_mel
    gen = datasets.Wav2LipDataset(copy, "train", copy / "filelists")
    assert all(v.starts[0] == 1 for v in gen.videos)  # get_segmented_mels needs frame - 1 >= 0


def test_crop_audio_window_matches_the_original_formula():
    mel = np.arange(80 * 300, dtype=np.float32).reshape(80, 300)
    for frame in (0, 1, 3, 7, 24, 50):
        start = int(80.0 * (frame / float(25)))
        np.testing.assert_array_equal(datasets.crop_audio_window(mel, frame, 25), mel[:, start : start + 16])
    segs = datasets.get_segmented_mels(mel, 10, 25)
    assert segs.shape == (5, 80, 16)
    for k in range(5):  # frame 10+k: window from frame 10+k-1
        np.testing.assert_array_equal(segs[k], datasets.crop_audio_window(mel, 10 + k - 1, 25))
    assert datasets.get_segmented_mels(mel, 0, 25) is None


def test_expert_sample(copy):
    ds = datasets.SyncDataset(copy, "train", copy / "filelists")
    ys = set()
    for i in range(0, len(ds), 7):
        x, mel, y = ds[i]
        assert x.shape == (15, 48, 96) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
        assert mel.shape == (1, 80, 16) and y.shape == (1,)
        ys.add(float(y))
    assert ys == {0.0, 1.0}
    # a positive: the lower halves of frames start..start+4, BGR, frame-major on channels
    video, start = ds.locate(3)
    window = ds.read_window(video.folder, start)
    x = datasets.to_sync_input(window)
    np.testing.assert_allclose(x[3:6].numpy(), window[1, 48:].transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_generator_sample(copy):
    ds = datasets.Wav2LipDataset(copy, "train", copy / "filelists")
    x, indiv, mel, gt = ds[5]
    assert x.shape == (6, 5, 96, 96) and indiv.shape == (5, 1, 80, 16) and mel.shape == (1, 80, 16)
    assert gt.shape == (3, 5, 96, 96)
    assert torch.all(x[:3, :, 48:] == 0) and torch.equal(x[:3, :, :48], gt[:, :, :48])
    video, start = ds.locate(5)
    full = datasets.load_mel(video.folder)
    np.testing.assert_array_equal(mel[0].numpy(), datasets.crop_audio_window(full, start, 25))
    np.testing.assert_array_equal(indiv[2, 0].numpy(), datasets.crop_audio_window(full, start + 1, 25))


def test_mel_cache_is_built_once_and_equals_recomputing(copy):
    folder = copy / "spk00" / "00000"
    assert not (folder / "mel.npy").exists()
    ds = datasets.SyncDataset(copy, "train", copy / "filelists")
    ds[0]
    cache = folder / "mel.npy"
    assert cache.is_file() and not list(folder.glob(".mel.*"))
    np.testing.assert_array_equal(np.load(cache), datasets.compute_mel(folder / "audio.wav"))
    mtime = cache.stat().st_mtime_ns
    for i in range(10):
        ds[i]
    assert cache.stat().st_mtime_ns == mtime


def test_mel_cache_name_depends_on_audio_hparams():
    assert datasets.mel_cache_name(hparams) == "mel.npy"
    assert datasets.mel_cache_name(hparams.parse("fmin=40")).startswith("mel_")
    assert datasets.mel_cache_name(hparams.parse("batch_size=3")) == "mel.npy"


def test_original_preprocessed_dataset_with_44k_audio_trains_without_reprocessing(tmp_path):
    """The original preprocess.py copied the source's rate: no mel.npy, audio.wav at 44.1 kHz."""
    root = tmp_path / "orig"
    make_dataset(root, speakers=2, videos_per_speaker=1, seconds=2.0, filelists_dir=root / "filelists",
                 sample_rate=44100)  # fmt: skip
    folder = root / "spk00" / "00000"
    assert not (folder / "mel.npy").exists()
    predicted = datasets.mel_length(folder)  # from the wav header, before any decoding
    ds = datasets.Wav2LipDataset(root, "train", root / "filelists")
    assert predicted == datasets.load_mel(folder).shape[1]
    for i in range(len(ds)):
        ds[i]


def test_frame_index_comes_from_the_file_name(copy):
    folder = copy / "spk00" / "00000"
    (folder / "20.jpg").unlink()  # a frame without a face: windows 16..20 are gone
    ds = datasets.SyncDataset(copy, "train", copy / "filelists")
    video = next(v for v in ds.videos if v.folder == folder)
    assert not set(range(16, 21)) & set(video.frame_windows.tolist())
    assert {15, 21} <= set(video.frame_windows.tolist())


def test_short_videos_are_left_out(copy):
    folder = copy / "spk00" / "00000"
    for f in folder.glob("*.jpg"):
        if datasets.frame_id(f.name) >= 15:
            f.unlink()
    ds = datasets.SyncDataset(copy, "train", copy / "filelists")
    assert folder not in [v.folder for v in ds.videos]


def test_neg_min_offset(copy):
    ds = datasets.SyncDataset(copy, "train", copy / "filelists", neg_min_offset=10)
    video = ds.videos[0]
    for start in (0, 20, 40):
        for _ in range(30):
            assert abs(ds.other_window(video, start, 10) - start) >= 10


def test_bad_image_is_reported_once_and_skipped(copy, capsys):
    folder = copy / "spk00" / "00001"
    (folder / "7.jpg").write_bytes(b"not a jpeg")
    ds = datasets.Wav2LipDataset(copy, "train", copy / "filelists")
    samples = [ds[i] for i in range(len(ds))]
    assert len(samples) == len(ds)
    err = capsys.readouterr().err
    assert err.count(str(folder)) == 1 and "7.jpg cannot be read" in err
    assert ds.bad == {folder}


def test_every_video_unreadable_stops_with_an_error(copy):
    ds = datasets.SyncDataset(copy, "train", copy / "filelists")
    for v in ds.videos:
        for f in v.folder.glob("*.jpg"):
            f.write_bytes(b"")
    with pytest.raises(UserError, match="could not be read"):
        ds[0]


def test_missing_filelist(copy):
    with pytest.raises(UserError, match=r"train\.txt: filelist not found"):
        datasets.SyncDataset(copy, "train", copy / "nowhere")


def test_missing_data_root(copy):
    with pytest.raises(UserError, match="data root not found"):
        datasets.SyncDataset(copy / "nope", "train", copy / "filelists")


def test_filelist_entry_without_folder(copy, capsys):
    with open(copy / "filelists" / "train.txt", "a") as f:
        f.write("spk09/00042\n")
    ds = datasets.SyncDataset(copy, "train", copy / "filelists")  # skipped with a warning (issue 14)
    assert len(ds.videos) == 2 and "1 of 3 entries have no folder" in capsys.readouterr().err
    (copy / "filelists" / "train.txt").write_text("spk09/00042\n")
    with pytest.raises(UserError, match=r"1 of 1 entries have no folder .*spk09/00042"):
        datasets.SyncDataset(copy, "train", copy / "filelists")


def test_empty_dataset_after_filtering(copy):
    for f in copy.glob("spk00/*/*.jpg"):
        if datasets.frame_id(f.name) % 3 == 0:
            f.unlink()  # no 5 consecutive frames anywhere
    with pytest.raises(UserError, match="no usable window"):
        datasets.SyncDataset(copy, "train", copy / "filelists")


def test_filelist_lines_as_the_original(copy):
    (copy / "filelists" / "train.txt").write_text("spk00/00000 123\n\nspk00/00001\n")
    ds = datasets.SyncDataset(copy, "train", copy / "filelists")
    assert [v.folder.name for v in ds.videos] == ["00000", "00001"]


def test_concurrent_cache_builders_leave_one_whole_file(copy):
    """Several DataLoader workers build the same clip's cache at once."""
    folder = copy / "spk01" / "00000"
    ds = datasets.SyncDataset(copy, "val", copy / "filelists")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=True)
    for _ in loader:
        pass
    assert np.load(folder / "mel.npy").shape[0] == 80
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_read_only_dataset_still_works(copy, monkeypatch):
    """A folder that refuses the cache (a read-only mount; chmod cannot show it to root): mel in memory."""
    folder = copy / "spk00" / "00000"

    def read_only(path, **kwargs):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(datasets, "atomic_path", read_only)
    mel = datasets.load_mel(folder)
    assert mel.shape == (80, 161) and not (folder / "mel.npy").exists()
    np.testing.assert_array_equal(mel, datasets.compute_mel(folder / "audio.wav"))


def test_audio_step_constant():
    assert datasets.SYNCNET_MEL_STEP_SIZE == audio.MEL_STEP_SIZE == 16

"""LRS2-style training data for both trainers: windows of 5 face crops and the 0.2 s of speech they show.

A preprocessed video is a folder `<data_root>/<speaker>/<video>/` holding face crops named by their frame
index (`0.jpg … N.jpg`, frames without a face missing) and `audio.wav`. The filelists
(`<filelists_dir>/{train,val}.txt`) name the folders, one `<speaker>/<video>` per line, as the original's.

What the original did, kept here:
- a window is T=5 consecutive frame indices; its speech is the 16 mel columns from `int(80 * frame / fps)`;
- the expert sees the lower half of the 5 frames (stacked on channels) with either the window's own speech
  (y=1) or the speech of the window it was paired with while the frames come from another window of the
  same video (y=0), each half of the time;
- the generator sees the window with its lower half masked, beside a random other window of the same video
  as reference, with one 16-column mel per frame (`get_segmented_mels`: frame i's window starts at i-2);
- videos with 15 frames or fewer are left out; images are resized to `img_size`; channels stay BGR.

What changes, for speed and robustness:
- `__len__` is the number of usable windows and index i is window i (the original drew a random video per
  sample and had `__len__` = number of videos);
- the mel spectrogram is computed once per video and cached as `mel.npy` beside `audio.wav` (the original
  decoded the audio and recomputed the whole clip's spectrogram for every sample); the cache is written
  atomically, so DataLoader workers and DDP ranks may build it at the same time;
- a file that cannot be read is reported once and its video skipped, instead of retrying forever;
- `neg_min_offset`: the expert's negatives lie at least this many frames from the positive;
- no batch holds a single sample (`batch_indices`): a last batch of one, in an epoch, an evaluation or a
  DDP shard, joins the batch before it. The expert's BatchNorm (trained, and frozen in train mode inside
  the generator's sync loss, as the original) cannot normalise one sample of its 1×1 audio features.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

import audio
from common.atomic_files import atomic_path
from common.errors import UserError
from hparams import HParams, hparams

SYNCNET_T = 5  # frames per window: 0.2 s at 25 fps
SYNCNET_MEL_STEP_SIZE = audio.MEL_STEP_SIZE  # 16 mel columns: 0.2 s
MIN_FRAMES = 3 * SYNCNET_T  # the original skips videos with this many face crops or fewer
MAX_RETRIES = 50  # unreadable samples replaced by others before giving up
MIN_BATCH = 2  # BatchNorm in train mode needs two values per channel; a 1×1 feature map has one per sample
AUDIO_HPARAMS = (
    "num_mels", "rescale", "rescaling_max", "use_lws", "n_fft", "hop_size", "win_size", "sample_rate",
    "frame_shift_ms", "signal_normalization", "allow_clipping_in_normalization", "symmetric_mels",
    "max_abs_value", "preemphasize", "preemphasis", "min_level_db", "ref_level_db", "fmin", "fmax",
)  # fmt: skip


# --- filelists -------------------------------------------------------------------------------------------


def read_filelist(
    data_root: str | os.PathLike, split: str, filelists_dir: str | os.PathLike = "filelists"
) -> list[Path]:
    """The video folders of `<filelists_dir>/<split>.txt`, resolved against `data_root`.

    As `hparams.get_image_list`: a line is `<speaker>/<video>`, anything after a space is ignored.
    """
    data_root, listfile = Path(data_root), Path(filelists_dir) / f"{split}.txt"
    if not data_root.is_dir():
        raise UserError(f"{data_root}: data root not found; pass the folder preprocess.py wrote with --data_root")
    if not listfile.is_file():
        raise UserError(
            f"{listfile}: filelist not found; put {split}.txt (lines '<speaker>/<video>') in --filelists_dir, "
            "or write one with preprocess.py --filelist_out"
        )
    entries = [line.split()[0] for line in listfile.read_text().splitlines() if line.strip()]
    if not entries:
        raise UserError(
            f"{listfile}: the filelist is empty; list the videos ('<speaker>/<video>') of the {split} split"
        )
    for e in entries:
        if Path(e).is_absolute() or ".." in Path(e).parts:
            raise UserError(f"{listfile}: entry {e!r} points outside --data_root; lines must be '<speaker>/<video>'")
    folders = [data_root / e for e in entries]
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        what = f"{len(missing)} of {len(folders)} entries have no folder under {data_root}, e.g. {missing[0]}"
        if len(missing) == len(folders):
            raise UserError(f"{listfile}: {what}; preprocess those videos or pass the matching --data_root")
        print(f"warning: {listfile}: {what}; skipped (preprocess them or remove them from the list)", file=sys.stderr)
    return [f for f in folders if f.is_dir()]


# --- the mel cache ---------------------------------------------------------------------------------------


def mel_cache_name(hp: HParams = hparams) -> str:
    """`mel.npy` for the default audio hyperparameters; other settings get their own file."""
    changed = {k: getattr(hp, k) for k in AUDIO_HPARAMS if getattr(hp, k) != getattr(hparams, k)}
    if not changed:
        return "mel.npy"
    return f"mel_{hashlib.sha1(repr(sorted(changed.items())).encode()).hexdigest()[:10]}.npy"


def compute_mel(wav_path: str | os.PathLike, hp: HParams = hparams) -> np.ndarray:
    """(num_mels, T) float32 of a whole clip: what the original recomputed for every sample."""
    return audio.melspectrogram(audio.load_wav(wav_path, hp.sample_rate), hp).astype(np.float32)


def load_mel(folder: str | os.PathLike, hp: HParams = hparams, write: bool = True) -> np.ndarray:
    """The clip's (num_mels, T) mel spectrogram from its cache, building the cache on first use.

    The cache is rebuilt when `audio.wav` is newer. It is written to a temporary file and renamed, so a
    concurrent reader sees either no file or a whole one, and concurrent writers just race to the same
    content. A read-only dataset is computed in memory (with `write=False` too).
    """
    folder = Path(folder)
    wav_path, cache = folder / "audio.wav", folder / mel_cache_name(hp)
    try:
        if cache.stat().st_mtime >= wav_path.stat().st_mtime:
            mel = np.load(cache)
            if mel.ndim == 2 and mel.shape[0] == hp.num_mels:
                return mel
    except (OSError, ValueError):
        pass  # no cache yet, or a damaged one: build it
    mel = compute_mel(wav_path, hp)
    if write:
        with contextlib.suppress(OSError), atomic_path(cache) as tmp:  # not writable: keep it in memory only
            np.save(tmp, mel)
    return mel


def mel_length(folder: Path, hp: HParams = hparams) -> int:
    """Columns of the clip's mel spectrogram, read from the cache's or the wav's header when possible."""
    cache = folder / mel_cache_name(hp)
    wav_path = folder / "audio.wav"
    try:
        if cache.stat().st_mtime >= wav_path.stat().st_mtime:
            return int(np.load(cache, mmap_mode="r").shape[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        from scipy.io import wavfile

        rate, samples = wavfile.read(wav_path, mmap=True)
        n = len(samples)
        if rate != hp.sample_rate:  # audio.load_wav resamples with librosa, whose output is ceil(n * ratio) long
            n = math.ceil(n * hp.sample_rate / rate)
        return 1 + n // hp.hop_length()
    except (OSError, ValueError):
        return load_mel(folder, hp).shape[1]  # not a plain WAV: decode it now (and cache it)


# --- windows ---------------------------------------------------------------------------------------------


def frame_id(name: str) -> int:
    """The frame index a crop's file name carries: `12.jpg` → 12."""
    return int(os.path.basename(name).split(".")[0])


def mel_start(frame: int, fps: float) -> int:
    """First mel column of a frame, exactly as the original computed it."""
    return int(80.0 * (frame / float(fps)))


def crop_audio_window(mel: np.ndarray, frame: int, fps: float) -> np.ndarray:
    """The (num_mels, 16) window of speech starting at `frame`."""
    start = mel_start(frame, fps)
    return mel[:, start : start + SYNCNET_MEL_STEP_SIZE]


def get_segmented_mels(mel: np.ndarray, frame: int, fps: float) -> np.ndarray | None:
    """One (num_mels, 16) window per frame of the 5-frame window at `frame`: (5, num_mels, 16).

    As the original: frame `frame + k`'s speech starts at frame `frame + k - 1`, two frames before its
    1-based index, so it is centred on the frame. None where the first window starts before 0.
    """
    if frame - 1 < 0:
        return None
    mels = [crop_audio_window(mel, i - 2, fps) for i in range(frame + 1, frame + 1 + SYNCNET_T)]
    if any(m.shape[1] != SYNCNET_MEL_STEP_SIZE for m in mels):
        return None
    return np.stack(mels)


@dataclass
class Video:
    folder: Path
    frame_windows: np.ndarray  # first frames of every 5 consecutive crops
    starts: np.ndarray  # first frames of the windows this dataset samples (their speech fits too)


def scan_video(folder: Path, hp: HParams, segmented: bool) -> Video | None:
    """The windows of one video folder, or None when it has too few frames (as the original)."""
    ids = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.endswith(".jpg"):
                try:
                    ids.append(frame_id(entry.name))
                except ValueError:
                    continue
    if len(ids) <= MIN_FRAMES:
        return None
    present = np.zeros(max(ids) + 1, bool)
    present[ids] = True
    run = np.lib.stride_tricks.sliding_window_view(present, SYNCNET_T).all(axis=1)
    frame_windows = np.flatnonzero(run)
    n_mel = mel_length(folder, hp)
    # the last 16-column window a window needs: its own (expert), or that of its last frame minus one
    last_needed = frame_windows + (SYNCNET_T - 2 if segmented else 0)
    fits = np.array([mel_start(f, hp.fps) for f in last_needed], dtype=np.int64) + SYNCNET_MEL_STEP_SIZE <= n_mel
    if segmented:
        fits &= frame_windows >= 1
    return Video(folder, frame_windows, frame_windows[fits])


class LRS2Windows(Dataset):
    """Every usable 5-frame window of the videos of one split; subclasses say what a sample is."""

    segmented = False  # whether samples need get_segmented_mels (the generator)

    def __init__(
        self,
        data_root: str | os.PathLike,
        split: str,
        filelists_dir: str | os.PathLike = "filelists",
        hp: HParams = hparams,
        *,
        cache_mel: bool = True,
        folders: list[Path] | None = None,
    ) -> None:
        self.hp, self.cache_mel = hp, cache_mel
        self.filelist = Path(filelists_dir) / f"{split}.txt"
        folders = read_filelist(data_root, split, filelists_dir) if folders is None else folders
        self.videos: list[Video] = []
        self.bad: set[Path] = set()  # videos with an unreadable file, reported once and then skipped
        unusable: list[Path] = []  # readable videos too short to give a window
        for folder in folders:
            try:
                video = scan_video(folder, hp, self.segmented)
            except (OSError, ValueError, EOFError, UserError) as e:  # an unreadable audio.wav or folder
                self.report_bad(folder, e)
                continue
            if video is not None and len(video.starts):
                self.videos.append(video)
            else:
                unusable.append(folder)
        self.offsets = np.cumsum([0] + [len(v.starts) for v in self.videos])
        if unusable and len(self):  # with nothing usable at all, the error below says it
            print(f"warning: {len(unusable)} of the {len(folders)} videos in {self.filelist} have no usable window "
                  f"(too few face crops, or audio.wav too short), e.g. {unusable[0]}: skipped", file=sys.stderr)  # fmt: skip
        if len(self) == 0:
            raise UserError(
                f"{self.filelist}: no usable window in its {len(folders)} videos under {data_root} (a video needs "
                f"more than {MIN_FRAMES} face crops, {SYNCNET_T} consecutive ones, and audio.wav covering them); "
                "check that preprocess.py finished and that --data_root and --filelists_dir match"
            )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[Video, int]:
        """Window `index` as (video, first frame)."""
        v = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.videos[v], int(self.videos[v].starts[index - self.offsets[v]])

    def report_bad(self, folder: Path, error: BaseException) -> None:
        if folder not in self.bad:
            self.bad.add(folder)
            print(f"warning: {folder}: skipped ({error})", file=sys.stderr)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        """Sample `index`; one whose files cannot be read is replaced by the next readable window."""
        for attempt in range(MAX_RETRIES):
            video, start = self.locate((index + attempt * 7919) % len(self))  # 7919: hop to another video
            if video.folder in self.bad:
                continue
            try:
                return self.sample(video, start)
            except (OSError, ValueError, UserError) as e:
                self.report_bad(video.folder, e)
        raise UserError(
            f"{self.filelist}: {len(self.bad)} videos could not be read (see the warnings above), the last "
            f"{MAX_RETRIES} samples tried all failed; check the dataset under {self.videos[0].folder.parent.parent}"
        )

    def sample(self, video: Video, start: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    # -- reading --

    def mel(self, folder: Path) -> np.ndarray:
        if self.cache_mel:
            return load_mel(folder, self.hp)
        return compute_mel(folder / "audio.wav", self.hp)  # the original's way, for bench/dataloader.py

    def read_window(self, folder: Path, start: int) -> np.ndarray:
        """(5, img_size, img_size, 3) uint8 BGR crops of frames start … start+4."""
        size = self.hp.img_size
        frames = []
        for i in range(start, start + SYNCNET_T):
            img = read_jpeg(folder / f"{i}.jpg")
            frames.append(cv2.resize(img, (size, size)))
        return np.stack(frames)

    def other_window(self, video: Video, start: int, min_offset: int = 1) -> int:
        """A random 5-frame window of the same video at least `min_offset` frames away (else the farthest)."""
        candidates = video.frame_windows[np.abs(video.frame_windows - start) >= max(min_offset, 1)]
        if len(candidates) == 0:
            return int(video.frame_windows[np.argmax(np.abs(video.frame_windows - start))])
        return int(random.choice(candidates))


def read_jpeg(path: Path) -> np.ndarray:
    """A BGR crop; a truncated file (cv2 decodes what is there and greys out the rest) is an error."""
    buf = np.fromfile(path, np.uint8)
    if b"\xff\xd9" not in buf[-32:].tobytes():  # JPEG's end-of-image marker: absent when the file was cut short
        raise ValueError(f"{path.name} cannot be read as an image (truncated, or not a JPEG)")
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path.name} cannot be read as an image")
    return img


class SyncDataset(LRS2Windows):
    """Samples of the lip-sync expert: (x (15, H/2, W), mel (1, 80, 16), y (1,)), y = 1 in sync, 0 not."""

    def __init__(self, *args, neg_min_offset: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.neg_min_offset = neg_min_offset

    def sample(self, video: Video, start: int) -> tuple[torch.Tensor, ...]:
        if random.random() < 0.5:
            y, chosen = 1.0, start
        else:
            y, chosen = 0.0, self.other_window(video, start, self.neg_min_offset)
        window = self.read_window(video.folder, chosen)
        mel = crop_audio_window(self.mel(video.folder), start, self.hp.fps)
        return to_sync_input(window), torch.from_numpy(np.ascontiguousarray(mel))[None], torch.tensor([y])


def to_sync_input(window: np.ndarray) -> torch.Tensor:
    """(5, H, W, 3) uint8 → (15, H/2, W) float in [0, 1]: frames stacked on channels, lower half."""
    h = window.shape[1]
    x = np.concatenate(list(window), axis=2)  # H × W × 15, frame-major as the original's np.concatenate
    x = x[h // 2 :].transpose(2, 0, 1).astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(x))


class Wav2LipDataset(LRS2Windows):
    """Samples of the generator: (x (6, 5, H, W), indiv_mels (5, 1, 80, 16), mel (1, 80, 16), gt (3, 5, H, W)).

    x is the window with its lower half zeroed, then a random other window of the same video as reference.
    """

    segmented = True

    def sample(self, video: Video, start: int) -> tuple[torch.Tensor, ...]:
        wrong = self.other_window(video, start)
        window = self.read_window(video.folder, start)
        wrong_window = self.read_window(video.folder, wrong)
        mel = self.mel(video.folder)
        indiv_mels = get_segmented_mels(mel, start, self.hp.fps)
        if indiv_mels is None:
            raise ValueError(f"audio.wav is too short for frames {start}-{start + SYNCNET_T - 1}")
        gt = prepare_window(window)
        masked = gt.copy()
        masked[:, :, gt.shape[2] // 2 :] = 0.0
        x = np.concatenate([masked, prepare_window(wrong_window)], axis=0)
        return (
            torch.from_numpy(x),
            torch.from_numpy(np.ascontiguousarray(indiv_mels))[:, None],
            torch.from_numpy(np.ascontiguousarray(crop_audio_window(mel, start, self.hp.fps)))[None],
            torch.from_numpy(gt),
        )


def prepare_window(window: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 → (3, T, H, W) float32 in [0, 1]."""
    return np.ascontiguousarray(window.transpose(3, 0, 1, 2), dtype=np.float32) / np.float32(255.0)


# --- batches ---------------------------------------------------------------------------------------------


def batch_indices(indices: Sequence[int], batch_size: int, drop_last: bool) -> list[list[int]]:
    """`indices` in order, in batches of `batch_size`, none of a single sample.

    With `drop_last`, an incomplete last batch is dropped when a full one precedes it (the original's
    training loader). A last batch of one joins the batch before it (one sample more there), so an
    evaluation still sees every window; when it is the only batch, its sample is taken twice, which leaves
    every mean over the batch unchanged. `batch_size` is at least `MIN_BATCH` (`check_batch_size`).
    """
    batches = [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    if batches and len(batches[-1]) == 1:
        if len(batches) > 1:
            batches[-2].extend(batches.pop())
        else:
            batches[-1] *= 2
    return batches


def check_batch_size(batch_size: int, name: str) -> None:
    """A batch of one cannot train (see `MIN_BATCH`): a one-line error naming the hyperparameter."""
    if batch_size < MIN_BATCH:
        raise UserError(
            f"{name}={batch_size}: batches need at least {MIN_BATCH} samples (BatchNorm normalises over the "
            f"batch); set --hparams {name}={MIN_BATCH} or more"
        )


class Batches(Sampler[list[int]]):
    """A DataLoader's `batch_sampler`: this rank's share of the windows (`sampler`, a DistributedSampler) in
    `batch_indices`' batches; `set_epoch` reshuffles, as the sampler's."""

    def __init__(self, sampler: DistributedSampler, batch_size: int, drop_last: bool) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last

    def __iter__(self) -> Iterator[list[int]]:
        return iter(batch_indices(list(self.sampler), self.batch_size, self.drop_last))

    def __len__(self) -> int:
        return len(batch_indices(range(len(self.sampler)), self.batch_size, self.drop_last))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

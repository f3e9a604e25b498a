"""A small synthetic LRS2-like dataset whose lip sync a network can learn in minutes on a CPU.

Each clip is a drawn face at 25 fps whose mouth opens with the loudness of the audio, frame by frame; the
audio is syllable-like bursts (a voiced harmonic tone under a smooth envelope) separated by pauses. So a
5-frame window of mouth shapes matches exactly one 0.2 s stretch of sound, which is all the lip-sync
expert has to discover.

Two layouts, the same faces and sounds:
- raw videos, `<root>/<speaker>/<video>.mp4` (H.264 + AAC), as LRS2's `main/` folder, for preprocess.py;
- preprocessed, `<root>/<speaker>/<video>/{0..N}.jpg + audio.wav`, as preprocess.py writes it, so the
  trainers can be tested without a face detector.

    python -m tools.make_synthetic_lrs2 --out /tmp/synth --layout preprocessed --filelists_dir /tmp/synth/filelists
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python tools/make_synthetic_lrs2.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from dataclasses import dataclass

import cv2
import numpy as np

from audio import resample, save_wav
from common.atomic_files import atomic_path, write_text_atomic
from hparams import hparams

SAMPLE_RATE = hparams.sample_rate  # 16 kHz, what preprocess.py writes
FPS = hparams.fps  # 25: the rate the trainers index crops at
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640 samples = 40 ms
FRAME_SIZE = 160  # raw video frames are 160×160
FACE_BOX = (30, 16, 130, 136)  # x1, y1, x2, y2 of the drawn face in a raw frame: 100×120


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # (N, FRAME_SIZE, FRAME_SIZE, 3) BGR uint8
    wav: np.ndarray  # (N * SAMPLES_PER_FRAME,) float32 in [-1, 1]
    opening: np.ndarray  # (N,) mouth opening in [0, 1], one per frame


def syllables(n_frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Speech-like audio: voiced bursts of 0.08–0.32 s between pauses of 0.04–0.24 s; and its envelope."""
    n = n_frames * SAMPLES_PER_FRAME
    envelope = np.zeros(n, np.float32)
    t = int(rng.integers(0, 4)) * SAMPLES_PER_FRAME
    while t < n:
        length = int(rng.integers(2, 9)) * SAMPLES_PER_FRAME
        burst = np.sin(np.linspace(0, np.pi, length)) ** 0.5 * rng.uniform(0.6, 1.0)
        end = min(n, t + length)
        envelope[t:end] = burst[: end - t]
        t = end + int(rng.integers(1, 7)) * SAMPLES_PER_FRAME
    time = np.arange(n) / SAMPLE_RATE
    f0 = rng.uniform(110, 240) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(1, 3) * time))  # a little intonation
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    wav = 0.5 * envelope * voice / 2.6 + 0.003 * rng.standard_normal(n)
    return np.clip(wav, -1, 1).astype(np.float32), envelope


def mouth_openings(envelope: np.ndarray) -> np.ndarray:
    """Per video frame, the loudness of the 40 ms of sound it shows (RMS of the envelope), in [0, 1]."""
    per_frame = envelope.reshape(-1, SAMPLES_PER_FRAME)
    return np.clip(np.sqrt((per_frame**2).mean(axis=1)), 0, 1)


def draw_face(opening: float, skin: tuple[int, int, int], offset: tuple[int, int], noise: np.ndarray) -> np.ndarray:
    """A raw frame: textured background, a face in FACE_BOX (shifted by `offset`), a mouth open by `opening`."""
    frame = noise.copy()
    x1, y1, x2, y2 = FACE_BOX
    cx, cy = (x1 + x2) // 2 + offset[0], (y1 + y2) // 2 + offset[1]
    w, h = (x2 - x1) // 2, (y2 - y1) // 2
    cv2.ellipse(frame, (cx, cy), (w - 2, h - 2), 0, 0, 360, skin, -1, cv2.LINE_AA)
    for ex in (cx - w // 2, cx + w // 2):
        cv2.circle(frame, (ex, cy - h // 3), 7, (250, 250, 250), -1, cv2.LINE_AA)
        cv2.circle(frame, (ex, cy - h // 3), 3, (40, 30, 20), -1, cv2.LINE_AA)
    cv2.line(frame, (cx, cy - h // 6), (cx, cy + h // 6), tuple(int(c * 0.7) for c in skin), 3, cv2.LINE_AA)
    mouth_y = cy + h // 2
    cv2.ellipse(frame, (cx, mouth_y), (w // 2 + 4, 2 + int(opening * 20)), 0, 0, 360, (20, 10, 90), -1, cv2.LINE_AA)
    cv2.ellipse(frame, (cx, mouth_y), (w // 2 - 6, int(opening * 15)), 0, 0, 360, (5, 5, 10), -1, cv2.LINE_AA)
    return frame


def make_clip(n_frames: int, rng: np.random.Generator, skin: tuple[int, int, int]) -> Clip:
    wav, envelope = syllables(n_frames, rng)
    opening = mouth_openings(envelope)
    noise = rng.integers(60, 200, (FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    noise = cv2.GaussianBlur(noise, (0, 0), 3)
    offset = tuple(int(v) for v in rng.integers(-3, 4, 2))
    frames = np.stack([draw_face(o, skin, offset, noise) for o in opening])
    return Clip(frames, wav, opening)


def write_mp4(path: Path, frames: np.ndarray, wav: np.ndarray, fps: int = FPS) -> None:
    """H.264 (yuv420p) video and AAC audio, as LRS2's clips."""
    import av

    with atomic_path(path) as tmp, av.open(str(tmp), "w") as out:
        v = out.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        v.options = {"crf": "18", "preset": "ultrafast"}
        a = out.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        for frame in frames:
            out.mux(v.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        out.mux(v.encode(None))
        block = 1024
        for i in range(0, len(wav), block):
            chunk = wav[None, i : i + block].astype(np.float32)
            af = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            af.sample_rate, af.pts = SAMPLE_RATE, i
            out.mux(a.encode(af))
        out.mux(a.encode(None))


def write_preprocessed(folder: Path, clip: Clip, sample_rate: int = SAMPLE_RATE) -> None:
    """What preprocess.py writes for this clip: face crops `{i}.jpg` and `audio.wav` (no mel cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    x1, y1, x2, y2 = FACE_BOX
    for i, frame in enumerate(clip.frames):
        cv2.imwrite(str(folder / f"{i}.jpg"), frame[y1:y2, x1:x2])
    wav = clip.wav
    if sample_rate != SAMPLE_RATE:
        wav = resample(wav, SAMPLE_RATE, sample_rate)
    save_wav(wav, folder / "audio.wav", sample_rate)


def make_dataset(
    root: str | Path,
    *,
    layout: str = "preprocessed",
    speakers: int = 3,
    videos_per_speaker: int = 3,
    seconds: float = 3.0,
    seed: int = 0,
    filelists_dir: str | Path | None = None,
    val_speakers: int = 1,
    sample_rate: int = SAMPLE_RATE,
) -> list[str]:
    """Write the dataset under `root`; returns the `<speaker>/<video>` names.

    With `filelists_dir`, also writes `train.txt` and `val.txt` there, the last `val_speakers` speakers
    held out for validation.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = []
    for s in range(speakers):
        skin = tuple(int(c) for c in rng.integers([90, 130, 170], [140, 180, 230]))
        for v in range(videos_per_speaker):
            clip = make_clip(round(seconds * FPS), rng, skin)
            speaker, video = f"spk{s:02d}", f"{v:05d}"
            if layout == "raw":
                write_mp4(root / speaker / f"{video}.mp4", clip.frames, clip.wav)
            elif layout == "preprocessed":
                write_preprocessed(root / speaker / video, clip, sample_rate)
            else:
                raise ValueError(f"layout must be 'raw' or 'preprocessed', not {layout!r}")
            names.append(f"{speaker}/{video}")
    if filelists_dir is not None:
        filelists_dir = Path(filelists_dir)
        val = {f"spk{s:02d}" for s in range(speakers - val_speakers, speakers)}
        write_text_atomic(filelists_dir / "train.txt", "".join(f"{n}\n" for n in names if n.split("/")[0] not in val))
        write_text_atomic(filelists_dir / "val.txt", "".join(f"{n}\n" for n in names if n.split("/")[0] in val))
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the dataset to")
    parser.add_argument("--layout", choices=["raw", "preprocessed"], default="preprocessed")
    parser.add_argument("--speakers", type=int, default=3)
    parser.add_argument("--videos_per_speaker", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--filelists_dir", default=None, help="also write train.txt/val.txt here (last speaker: val)")
    args = parser.parse_args(argv)
    names = make_dataset(
        args.out,
        layout=args.layout,
        speakers=args.speakers,
        videos_per_speaker=args.videos_per_speaker,
        seconds=args.seconds,
        seed=args.seed,
        filelists_dir=args.filelists_dir,
    )
    print(f"wrote {len(names)} clips under {args.out}")


if __name__ == "__main__":
    main()

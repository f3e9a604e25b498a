"""The original inference.py's way, re-created step for step, to time it on this machine.

    python -m bench.original_pipeline --face clip.mp4 --audio speech.wav --box 128 384 128 384 --checkpoint w.pth
    python -m bench.original_pipeline --face clip.mp4 --audio speech.wav --detector s3fd.pth --checkpoint w.pth

Not part of the project: a baseline for bench.inference_speed, which runs it in a fresh process with
glibc's default malloc, as the original ran. The steps and their costs are the original's:
- every frame read into a list with cv2.VideoCapture, the audio with librosa.load;
- without `--box`, S3FD on every frame at full resolution in batches of 16 (fp32), the box padded by the
  default pads (0 10 0 0) and smoothed over 5 frames; the network is face_detection's in fp32, NCHW as the
  original's, and its candidates and NMS are our vectorised ones (the original's per-anchor loop takes
  minutes per frame under deterministic weights, where every anchor scores): flattering the original;
- mel windows of 16 columns, the frames cut to their number;
- datagen: per frame a copy, the crop resized to 96×96, batches of 128 as float64 [masked, unmasked] / 255;
- the generator in NCHW float32 under torch.no_grad, its output ×255 truncated, resized and pasted;
- frames written to an MPEG-4 Part 2 (DIVX) AVI through cv2.VideoWriter in a temp folder;
- the final `ffmpeg -i audio -i result.avi -strict -2 -q:v 1 out.mp4`, done here with PyAV: the AVI
  decoded and encoded with libx264 at FFmpeg's defaults (preset medium, crf 23; libx264 ignores -q:v)
  and the audio with FFmpeg's AAC encoder, all codecs with FFmpeg's automatic threading.
The model is loaded before the clock starts (as bench.inference_speed does for ours), and so is
librosa's first call (about 3 s of lazy imports and numba compilation the original paid in every run):
the baseline is, if anything, flattered. The last line printed is the frames/s.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python bench/original_pipeline.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import tempfile
import time

import av
import cv2
import librosa
import numpy as np
import torch

import audio
from common.weights import load_model
from models import Wav2Lip

IMG_SIZE = 96
BATCH_SIZE = 128  # the original's --wav2lip_batch_size
FACE_DET_BATCH_SIZE = 16  # the original's --face_det_batch_size
PADS = (0, 10, 0, 0)  # the original's --pads: top, bottom, left, right
SMOOTH_T = 5  # frames over which the original averages the boxes
MEL_STEP = 16
SAMPLE_RATE = 16000


def read_all_frames(path: str) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(path)
    fps = capture.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            capture.release()
            return frames, fps
        frames.append(frame)


def mel_windows(mel: np.ndarray, fps: float) -> list[np.ndarray]:
    windows, i, mel_idx_multiplier = [], 0, 80.0 / fps
    while True:
        start = int(i * mel_idx_multiplier)
        if start + MEL_STEP > mel.shape[1]:
            windows.append(mel[:, -MEL_STEP:])
            return windows
        windows.append(mel[:, start : start + MEL_STEP])
        i += 1


def face_detect(frames: list[np.ndarray], detector_path: str) -> list[tuple[int, int, int, int]]:
    """The original's face_detect: S3FD per batch of 16 full frames, pads, then boxes averaged over 5 frames;
    (y1, y2, x1, x2) per frame."""
    import face_detection

    detector = face_detection.FaceAlignment(face_detection.LandmarksType._2D, flip_input=False, device="cpu",
                                            path_to_detector=detector_path)  # fmt: skip
    rects = []
    for i in range(0, len(frames), FACE_DET_BATCH_SIZE):
        rects.extend(detector.get_detections_for_batch(np.array(frames[i : i + FACE_DET_BATCH_SIZE])))
    pady1, pady2, padx1, padx2 = PADS
    height, width = frames[0].shape[:2]
    boxes = np.array([[max(0, r[0] - padx1), max(0, r[1] - pady1), min(width, r[2] + padx2),
                       min(height, r[3] + pady2)] for r in rects])  # fmt: skip
    for i in range(len(boxes)):
        window = boxes[len(boxes) - SMOOTH_T :] if i + SMOOTH_T > len(boxes) else boxes[i : i + SMOOTH_T]
        boxes[i] = np.mean(window, axis=0)
    return [(int(y1), int(y2), int(x1), int(x2)) for x1, y1, x2, y2 in boxes]


def datagen(frames: list[np.ndarray], mels: list[np.ndarray], boxes: list[tuple[int, int, int, int]]):
    crops = [[f[y1:y2, x1:x2], (y1, y2, x1, x2)] for f, (y1, y2, x1, x2) in zip(frames, boxes, strict=True)]
    img_batch, mel_batch, frame_batch, coords_batch = [], [], [], []

    def flush():
        img = np.asarray(img_batch)
        masked = img.copy()
        masked[:, IMG_SIZE // 2 :] = 0
        img = np.concatenate((masked, img), axis=3) / 255.0
        mel = np.asarray(mel_batch)
        return img, mel.reshape(len(mel), mel.shape[1], mel.shape[2], 1), frame_batch, coords_batch

    for i, m in enumerate(mels):
        idx = i % len(frames)
        frame_to_save = frames[idx].copy()
        face, coords = crops[idx].copy()
        img_batch.append(cv2.resize(face, (IMG_SIZE, IMG_SIZE)))
        mel_batch.append(m)
        frame_batch.append(frame_to_save)
        coords_batch.append(coords)
        if len(img_batch) >= BATCH_SIZE:
            yield flush()
            img_batch, mel_batch, frame_batch, coords_batch = [], [], [], []
    if img_batch:
        yield flush()


def remux_with_ffmpeg_defaults(avi: Path, audio_path: str, out: Path) -> None:
    """`ffmpeg -y -i audio -i avi -strict -2 -q:v 1 out.mp4`: x264 medium crf 23 + AAC, threads auto."""
    with av.open(str(avi)) as src, av.open(audio_path) as sound, av.open(str(out), "w") as dst:
        vin = src.streams.video[0]
        vin.thread_type = "AUTO"
        vout = dst.add_stream("libx264", rate=vin.average_rate)
        vout.width, vout.height, vout.pix_fmt = vin.width, vin.height, "yuv420p"
        vout.codec_context.thread_count = 0
        ain = sound.streams.audio[0]
        aout = dst.add_stream("aac", rate=ain.rate)
        aout.layout = "mono" if ain.codec_context.channels == 1 else "stereo"  # FFmpeg's guess for a bare wav
        for frame in src.decode(vin):
            frame.pts = None
            dst.mux(vout.encode(frame))
        dst.mux(vout.encode(None))
        resampler = av.AudioResampler(format=aout.format.name, layout=aout.layout.name, rate=aout.rate)
        for frame in sound.decode(ain):
            for resampled in resampler.resample(frame):
                dst.mux(aout.encode(resampled))
        for resampled in resampler.resample(None):
            dst.mux(aout.encode(resampled))
        dst.mux(aout.encode(None))


def run(model: torch.nn.Module, face: str, audio_path: str, box: tuple[int, int, int, int] | None, folder: Path,
        detector_path: str | None = None) -> int:  # fmt: skip
    frames, fps = read_all_frames(face)
    wav = librosa.load(audio_path, sr=SAMPLE_RATE)[0]
    mels = mel_windows(audio.melspectrogram(wav), fps)
    frames = frames[: len(mels)]
    boxes = [box] * len(frames) if box is not None else face_detect(frames, detector_path)  # inside datagen
    avi = folder / "result.avi"
    writer = None
    for img_batch, mel_batch, frame_batch, coords_batch in datagen(frames.copy(), mels, boxes):
        if writer is None:
            height, width = frames[0].shape[:-1]
            writer = cv2.VideoWriter(str(avi), cv2.VideoWriter_fourcc(*"DIVX"), fps, (width, height))
        img = torch.FloatTensor(np.transpose(img_batch, (0, 3, 1, 2)))
        mel = torch.FloatTensor(np.transpose(mel_batch, (0, 3, 1, 2)))
        with torch.no_grad():
            pred = model(mel, img)
        pred = pred.cpu().numpy().transpose(0, 2, 3, 1) * 255.0
        for p, f, (y1, y2, x1, x2) in zip(pred, frame_batch, coords_batch, strict=True):
            f[y1:y2, x1:x2] = cv2.resize(p.astype(np.uint8), (x2 - x1, y2 - y1))
            writer.write(f)
    writer.release()
    remux_with_ffmpeg_defaults(avi, audio_path, folder / "result_voice.mp4")
    return len(mels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--face", required=True)
    p.add_argument("--audio", required=True)
    p.add_argument("--box", nargs=4, type=int, help="top bottom left right (default: detect, with --detector)")
    p.add_argument("--detector", help="S3FD weights, to detect faces when there is no --box")
    p.add_argument("--checkpoint", required=True)
    args = p.parse_args()
    model = load_model(Wav2Lip(), args.checkpoint, "Wav2Lip", torch.device("cpu"))
    librosa.load(args.audio, sr=SAMPLE_RATE)  # warm-up: librosa's one-time costs stay off the clock
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        n_frames = run(model, args.face, args.audio, tuple(args.box) if args.box else None, Path(tmp), args.detector)
        elapsed = time.perf_counter() - start
    print(f"{n_frames} frames in {elapsed:.1f} s")
    print(n_frames / elapsed)


if __name__ == "__main__":
    main()

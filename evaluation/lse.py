"""LSE-D and LSE-C as Wav2Lip's `SyncNetInstance_calc_scores.evaluate` computes them.

Every 5-frame window of the video (0.2 s at syncnet_python's 25 fps, `media.FPS`) and the 20 MFCC columns
of the same 0.2 s are embedded by SyncNet. For each shift of the audio by -vshift..+vshift frames, the Euclidean distance
between the two embeddings is averaged over all windows. LSE-D is the smallest of those mean distances
(lower is better synced), LSE-C the median minus the smallest (higher: a clearer sync peak), and the AV
offset is the shift at the minimum.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import python_speech_features
import torch
from tqdm import tqdm

from common.atomic_files import atomic_path, check_writable, write_text_atomic
from common.devices import DTYPES, select_dtype
from common.errors import UserError
from evaluation import media
from evaluation.syncnet import S
from lipsync.options import PRECISION_FLAGS, ModelOptions, add_arguments

FRAME_SIZE = 224  # SyncNet's input resolution; the original resizes every frame to it
WINDOW_FRAMES = 5  # frames per lip window
MFCC_RATE = 100  # MFCC columns per second: python_speech_features' 10 ms step
MFCC_PER_FRAME = MFCC_RATE // media.FPS  # 4 columns per video frame
MFCC_WINDOW = WINDOW_FRAMES * MFCC_PER_FRAME  # 20 columns: the same 0.2 s
SAMPLES_PER_FRAME = media.SAMPLE_RATE // media.FPS  # 640 audio samples per video frame
MIN_FRAMES = WINDOW_FRAMES + 1  # the original stops one window early, so 6 frames give one window
DEFAULT_VSHIFT = 15  # frames of audio shift searched each way (calculate_scores_LRS.py's default)
DEFAULT_BATCH_SIZE = 20
BACKENDS = ("torch", "onnxruntime")  # what runs SyncNet
PAIRWISE_EPS = 1e-6  # torch.nn.functional.pairwise_distance adds it to the difference


@dataclass(frozen=True)
class LSEResult:
    offset: int  # AV offset in frames at the best shift
    lse_d: float  # minimum over shifts of the mean embedding distance
    lse_c: float  # median minus minimum of the mean distances
    mean_dists: tuple[float, ...]  # per shift, -vshift..+vshift of the audio

    def as_row(self) -> dict:
        return {"offset": self.offset, "lse_d": self.lse_d, "lse_c": self.lse_c}


def mfcc(audio: np.ndarray, sample_rate: int = media.SAMPLE_RATE) -> np.ndarray:
    """13 MFCCs every 10 ms [13, T] from raw int16 values, as python_speech_features computes them."""
    return python_speech_features.mfcc(audio, sample_rate).T


def num_windows(n_frames: int, n_audio_samples: int) -> int:
    """Windows the original scores: it stops at `min_length - 5`, one window short of the last."""
    return min(n_frames, n_audio_samples // SAMPLES_PER_FRAME) - WINDOW_FRAMES


def _lip_windows(clip: torch.Tensor) -> torch.Tensor:
    """BGR uint8 frames [L, H, W, 3] -> the L-4 overlapping windows [L-4, 3, 5, H, W] as float."""
    x = clip.permute(3, 0, 1, 2).float()  # [3, L, H, W]
    return x.unfold(1, WINDOW_FRAMES, 1).permute(1, 0, 4, 2, 3)


def _audio_windows(cc: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """MFCC [13, T] -> windows `start..start+count` [count, 1, 13, 20], hop 4 columns."""
    seg = cc[:, start * MFCC_PER_FRAME : (start + count - 1) * MFCC_PER_FRAME + MFCC_WINDOW]
    return seg.unfold(1, MFCC_WINDOW, MFCC_PER_FRAME).permute(1, 0, 2).unsqueeze(1)


@torch.no_grad()
def sync_features(
    model: S,
    frames: np.ndarray,
    cc: np.ndarray,
    n_windows: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lip and audio embeddings [n_windows, 1024] each, `batch_size` windows per forward pass.

    Frames travel to the device as uint8, a batch plus its 4-frame overlap at a time, so long videos
    never sit on the device as float.
    """
    if device is None:  # a torch module's parameters tell; onnx_backend.OnnxSyncNet says its device
        device = getattr(model, "device", None) or next(model.parameters()).device
    device = torch.device(device)
    cct = torch.from_numpy(np.ascontiguousarray(cc)).float().to(device)
    im_feat, cc_feat = [], []
    # TF32 would move the distances by ~1e-3 on Ampere GPUs; the metric is defined in float32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for i in range(0, n_windows, batch_size):
            count = min(batch_size, n_windows - i)
            clip = torch.from_numpy(frames[i : i + count + WINDOW_FRAMES - 1]).to(device)
            im_feat.append(model.forward_lip(_lip_windows(clip)).cpu())
            cc_feat.append(model.forward_aud(_audio_windows(cct, i, count)).cpu())
    return torch.cat(im_feat), torch.cat(cc_feat)


def score_features(im_feat: torch.Tensor, cc_feat: torch.Tensor, vshift: int = DEFAULT_VSHIFT) -> LSEResult:
    """Mean distance per audio shift (audio zero-padded at both ends, as `calc_pdist`), then LSE-D/C."""
    n = len(im_feat)
    padded = torch.nn.functional.pad(cc_feat, (0, 0, vshift, vshift))
    dists = torch.stack(
        [(im_feat - padded[k : k + n] + PAIRWISE_EPS).norm(dim=1) for k in range(2 * vshift + 1)], 0
    )  # [shifts, windows]
    mdist = dists.mean(1)
    minval, minidx = torch.min(mdist, 0)
    conf = torch.median(mdist) - minval  # torch.median: the lower middle value, as the original
    return LSEResult(vshift - int(minidx), float(minval), float(conf), tuple(mdist.tolist()))


def evaluate_clip(
    model: S,
    frames: np.ndarray,
    audio: np.ndarray,
    vshift: int = DEFAULT_VSHIFT,
    batch_size: int = DEFAULT_BATCH_SIZE,
    name: str = "<clip>",
) -> LSEResult:
    """LSE of BGR frames [T, 224, 224, 3] at `media.FPS` and their int16 16 kHz audio."""
    n = num_windows(len(frames), len(audio))
    if n < 1:
        raise UserError(
            f"{name}: too short for LSE ({len(frames)} frames, {len(audio) / media.SAMPLE_RATE:.2f} s of "
            f"audio); it needs at least {MIN_FRAMES} frames at {media.FPS} fps with audio as long"
        )
    im_feat, cc_feat = sync_features(model, frames, mfcc(audio), n, batch_size)
    return score_features(im_feat, cc_feat, vshift)


def evaluate_video(
    model: S,
    path: str | os.PathLike,
    vshift: int = DEFAULT_VSHIFT,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lossless: bool = False,
) -> LSEResult:
    """`SyncNetInstance.evaluate(opt, videofile)` of the LRS evaluation, without temporary files.

    `lossless=True` skips the JPEG round trip of the original frame extraction (its scores then match
    the original run with `-c:v png`, not the published protocol).
    """
    audio = media.read_audio(path)
    frames = media.read_frames(path, FRAME_SIZE, lossless)
    return evaluate_clip(model, frames, audio, vshift, batch_size, os.fspath(path))


# ---------------------------------------------------------------- many videos, result files

VIDEO_SUFFIX = ".mp4"


def list_videos(data_root: str | os.PathLike, suffix: str = VIDEO_SUFFIX) -> list[str]:
    """The `*.mp4` files directly inside `data_root`, sorted (the original's `glob`, made repeatable)."""
    root = os.fspath(data_root)
    if not os.path.isdir(root):
        raise UserError(f"{root}: not a directory; pass the folder holding the generated {suffix} videos")
    names = sorted(n for n in os.listdir(root) if n.lower().endswith(suffix))
    if not names:
        raise UserError(f"{root}: no {suffix} videos in it; pass the folder holding the generated videos")
    return [os.path.join(root, n) for n in names]


def average(rows: dict[str, dict]) -> tuple[float, float]:
    """(LSE-D, LSE-C) averaged over the rows that have scores."""
    scored = [r for r in rows.values() if r.get("lse_d") is not None]
    if not scored:
        return float("nan"), float("nan")
    return (
        float(np.mean([r["lse_d"] for r in scored])),
        float(np.mean([r["lse_c"] for r in scored])),
    )


def add_scoring_arguments(parser: argparse.ArgumentParser, rows: str) -> None:
    """The flags both LSE scripts share; `rows` says what a result row is (a video, a face track)."""
    parser.add_argument("--initial_model", default="data/syncnet_v2.model", help="syncnet_python's syncnet_v2.model")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="windows per forward pass")
    parser.add_argument("--vshift", type=int, default=DEFAULT_VSHIFT, help="audio shifts searched each way")
    parser.add_argument("--lossless", action="store_true", help="skip the JPEG round trip of the original")
    parser.add_argument("--out", help=f"write per-{rows} scores to this .json or .csv file")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (auto: CUDA when available)")
    parser.add_argument("--backend", default="torch", choices=BACKENDS, help="run SyncNet in PyTorch or ONNX Runtime")
    parser.add_argument("--onnx_path", help="with --backend onnxruntime: SyncNet's .onnx (export_onnx.py --model "
                        "syncnet); default: exported from --initial_model once, into the cache")  # fmt: skip
    parser.add_argument("--cache_dir", help="where that export is cached, in onnx/ (default: ~/.cache/wav2lip/onnx)")
    add_arguments(parser, ModelOptions, only=PRECISION_FLAGS)


def scoring_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """The dtype of the scripts' --precision (--fp16, --force_precision) on `device`, as inference chooses it
    (`common.devices.select_dtype`); says which ran, with the one-line note when it is not the one asked for."""
    model = ModelOptions(**{name: getattr(args, name) for name in PRECISION_FLAGS})
    dtype, note = select_dtype(model.precision, device, model.force_precision)
    name = next(name for name, known in DTYPES.items() if known == dtype)
    print(f"scoring on {device} in {name}" + (f". Note: {note}." if note else ""))
    return dtype


def check_results_path(out: str | os.PathLike) -> None:
    """Refuse a result file that could not be written before any video is scored, not after."""
    out = Path(out)
    if out.suffix.lower() not in (".json", ".csv"):
        raise UserError(f"{out}: unknown result format; name the file *.json or *.csv")
    check_writable(out.parent, "--out")


def write_results(rows: dict[str, dict], out: str | os.PathLike) -> None:
    """Per-video rows keyed by file name, as `.json` (a dict) or `.csv` (name plus the row's fields);
    written atomically, so an interrupted run never leaves a truncated result file."""
    check_results_path(out)
    if Path(out).suffix.lower() == ".json":
        write_text_atomic(out, json.dumps(rows, indent=1))
        return
    fields = ["name", *dict.fromkeys(k for r in rows.values() for k in r)]
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows({"name": name, **row} for name, row in rows.items())


def read_results(out: str | os.PathLike) -> dict[str, dict]:
    """The rows an earlier (interrupted) run wrote to `out`: none when it does not exist yet. A file that
    is not one of our result files is refused rather than overwritten."""
    out = Path(out)
    if not out.exists():
        return {}
    try:
        if out.suffix.lower() == ".json":
            rows = json.loads(out.read_text())
            if isinstance(rows, dict) and all(isinstance(r, dict) for r in rows.values()):
                return rows
        else:
            with open(out, newline="") as f:
                table = list(csv.DictReader(f))
            if table and "name" in table[0]:
                return {r.pop("name"): {k: _cell(v) for k, v in r.items()} for r in table}
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    raise UserError(f"{out}: exists and is not a result file of this script; move it away or choose another --out")


def _cell(text: str) -> object:
    """A CSV cell back as the value it was written from: '' is None, numbers are numbers."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def score_all(
    videos: list[str], score: Callable[[str], dict[str, dict]], out: str | os.PathLike | None = None
) -> dict[str, dict]:
    """Rows of every video: `score(path)`'s rows, or one error row when it fails, with `out` rewritten
    (atomically) after every video, so it is whole whenever the run stops; a restarted run keeps the
    rows `out` already has and scores only the videos without one (or with an error row)."""
    rows = {k: r for k, r in read_results(out).items() if not r.get("error")} if out else {}
    done = {name.split("/")[0] for name in rows}
    bar = tqdm(videos)
    for path in bar:
        name = Path(path).name
        if name in done:
            continue
        try:
            new = score(path)
        except Exception as e:  # noqa: BLE001 - a corrupt video (decoders raise anything) gets its row, the run goes on
            message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            new = {name: {"offset": None, "lse_d": None, "lse_c": None, "error": message}}
            tqdm.write(f"{name}: failed: {message}")
        rows.update(new)
        if out:
            write_results(rows, out)
        d, c = average(rows)
        bar.set_description(f"Avg Confidence: {round(c, 3)}, Avg Minimum Dist: {round(d, 3)}")
    return rows


def report(rows: dict[str, dict], out: str | os.PathLike | None = None) -> None:
    """Write the per-video rows to `out` (.json or .csv) if given, and print the averages as the original."""
    if out:
        write_results(rows, out)
    lse_d, lse_c = average(rows)
    print(f"Average Confidence: {lse_c}")
    print(f"Average Minimum Distance: {lse_d}")

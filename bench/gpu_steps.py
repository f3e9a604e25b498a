"""What the steps of `python -m bench.gpu_check` share, and the steps that hold the device to the CPU.

Shared: the sizes (full on a GPU, tiny with --quick or on the CPU), the `Run` (device, time left, and the
weights, media, models and dataset made on first use), `Skip` and `Failed`, and `run_command`. Steps here:
inference (frames and boxes), S3FD's boxes, the out-of-memory halving and LSE; bench/gpu_check.py holds
the training and timing steps and the runner.

A step is a function of the `Run` that returns (figure, data) when its check holds, raises `Skip` when it
cannot run here (fp16 and nccl need CUDA) and `Failed` when a check does not hold; any other exception
fails the step too. `Skip` and `Failed` carry the figures measured so far, so a CPU run still shows what
the step code computed. Only public APIs are used (`lipsync.LipSync`, `face_detection.FaceAlignment`,
`Generator.limit`, `evaluation.lse`), with the deterministic weights of tools/detweights.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

import face_detection
import lipsync
from bench.inference_speed import synthetic_clip
from common import video
from evaluation import lse, media
from evaluation.syncnet import S, copy_parameters
from face_detection import Box
from lipsync.frames import FrameSource
from lipsync.generation import batch_sizes, generator_workers
from lipsync.options import ModelOptions, Options
from tools.detweights import DATA, det_state_dict
from tools.make_synthetic_lrs2 import make_dataset

REPO = Path(__file__).resolve().parents[1]
LSE_VIDEO = DATA / "lse_video.mp4"  # the test video of tests/test_evaluation_lse.py
FACE_IMAGE = DATA / "face_320x448.png"  # the image S3FD's golden boxes were computed on
TINY_CONFIG = REPO / "configs" / "tiny.txt"
PSNR_DB = {False: 45.0, True: 35.0}  # least PSNR of the device's frames against the CPU's: fp32, fp16
BOX_TOLERANCE_PX = 1  # S3FD boxes on the device may differ from the CPU's by this much
LSE_RTOL = 1e-4
SYNC_WT = 0.01  # the generator's sync loss from the first step, so that it runs under AMP too
OOM_SHRINK = 8  # the memory left free fits about 1/8 of the first batch: it halves three times
HUGE_BATCH = 1 << 16  # --wav2lip_batch_size far beyond any card


class Skip(Exception):  # noqa: N818 - a step outcome, not an error
    """The step cannot run (or cannot prove its point) here; the message says why."""

    def __init__(self, reason: str, data: dict | None = None) -> None:
        super().__init__(reason)
        self.data = data or {}


class Failed(Exception):  # noqa: N818 - a step outcome, named as the table shows it
    """A check of the step does not hold; the message is its one-line report."""

    def __init__(self, reason: str, data: dict | None = None) -> None:
        super().__init__(reason)
        self.data = data or {}


@dataclass(frozen=True)
class Sizes:
    clip: tuple[int, int, float]  # width, height, seconds of the clip compared between devices
    big_clip: tuple[int, int, float]  # the clip timed end to end
    train_steps: int
    train_hparams: str  # overrides of configs/tiny.txt
    dataset_seconds: float  # length of each synthetic training clip
    lse_frames: int | None  # None: the whole test video
    generator_batches: tuple[int, ...]
    timed_frames: int  # frames per generator timing
    detect_frames: int  # frames of the big clip timed through S3FD
    train_step_args: tuple[str, ...]  # bench/train_step.py's sizes


FULL = Sizes((320, 256, 2.0), (1920, 1080, 4.0), 20, "", 2.0, None, (1, 16, 128), 1024, 32,
             ("--expert_batch", "64", "--generator_batch", "16", "--steps", "5", "--warmup", "2"))  # fmt: skip
QUICK = Sizes((128, 96, 0.24), (160, 96, 0.24), 1, "syncnet_batch_size=4", 1.0, 24, (1, 2), 2, 1,
              ("--expert_batch", "2", "--generator_batch", "2", "--steps", "1", "--warmup", "0"))  # fmt: skip


class Run:
    """What the steps share: the device, the sizes, the time left, and files and models made on first use."""

    def __init__(self, device: torch.device, sizes: Sizes, tmp: Path, deadline: float) -> None:
        self.device, self.sizes, self.tmp, self.deadline = device, sizes, tmp, deadline
        self._syncs: dict[tuple[str, bool], lipsync.LipSync] = {}
        self.references: dict[str, tuple[list[np.ndarray], list[Box | None]]] = {}  # the CPU's frames and boxes

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def saved(self, name: str, obj: object) -> Path:
        path = self.tmp / name
        if not path.is_file():
            torch.save(obj, path)
        return path

    @cached_property
    def wav2lip_checkpoint(self) -> Path:
        return self.saved("wav2lip_det.pth", {"state_dict": det_state_dict("Wav2Lip"), "global_step": 0})

    @cached_property
    def s3fd_weights(self) -> Path:
        return self.saved("s3fd_det.pth", det_state_dict("s3fd"))

    @cached_property
    def expert_checkpoint(self) -> Path:
        return self.saved("expert_det.pth", {"state_dict": det_state_dict("SyncNet_color"), "global_step": 0})

    def media(self, name: str, size: tuple[int, int, float]) -> tuple[Path, Path]:
        folder = self.tmp / name
        if not folder.is_dir():
            folder.mkdir()
            synthetic_clip(folder, size[2], size[0], size[1])
        return next(folder.glob("face_*.mp4")), folder / "speech.wav"

    @property
    def clip(self) -> tuple[Path, Path]:
        return self.media("clip", self.sizes.clip)

    @property
    def big_clip(self) -> tuple[Path, Path]:
        return self.media("big_clip", self.sizes.big_clip)

    def center_box(self, face: Path) -> list[int]:
        """--box (top, bottom, left, right) over the middle half of the frame."""
        info = video.probe(face)
        return [info.height // 4, info.height * 3 // 4, info.width // 4, info.width * 3 // 4]

    def sync(self, device: torch.device | str, fp16: bool = False) -> lipsync.LipSync:
        """The generator and detector loaded once per (device, precision)."""
        key = (str(device), fp16)
        if key not in self._syncs:
            model = ModelOptions(checkpoint_path=self.wav2lip_checkpoint, device=str(device), fp16=fp16,
                                 detector_path=self.s3fd_weights)  # fmt: skip
            self._syncs[key] = lipsync.LipSync(model, quiet=True)
        return self._syncs[key]

    @cached_property
    def dataset(self) -> Path:
        """A synthetic LRS2-like set for the trainers (train/val filelists in `filelists/`)."""
        root = self.tmp / "synth"
        seconds = self.sizes.dataset_seconds
        make_dataset(root, speakers=3, videos_per_speaker=2, seconds=seconds, seed=0, filelists_dir=root / "filelists")
        return root

    @cached_property
    def train_config(self) -> Path:
        """configs/tiny.txt with the sync loss on from the first step (and the sizes' overrides)."""
        path = self.tmp / "tiny_sync.txt"
        extra = "\n".join(filter(None, [f"syncnet_wt={SYNC_WT}", *self.sizes.train_hparams.split(",")]))
        path.write_text(f"{TINY_CONFIG.read_text()}\n{extra}\n")
        return path


def run_command(cmd: list[str], timeout: float) -> str:
    """stdout of `cmd` run from the repository root; Failed with its last error line, or when it outlives
    `timeout` (then its whole process group is killed, torchrun's workers included)."""
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            script = next((c for c in cmd if c.endswith(".py")), cmd[0])
            raise Failed(f"{script}: timed out after {timeout:.0f} s (the time budget)") from None
    if proc.returncode != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        raise Failed(f"exit code {proc.returncode}: {lines[-1] if lines else 'no error output'}")
    return out


# --- inference: the device's frames and boxes against the CPU's --------------------------------------------


def lipsync_frames(sync: lipsync.LipSync, face: Path, speech: Path, out: Path, **options) -> list[np.ndarray]:
    """Every output frame of one `LipSync` call, exactly as encoded."""
    frames: list[np.ndarray] = []
    sync(face, speech, out, on_frame=lambda i, f: frames.append(f.copy()), quiet=True, **options)
    return frames


def pasted_boxes(sync: lipsync.LipSync, face: Path, n_frames: int, **options) -> list[Box | None]:
    """The boxes the pipeline pastes into (padded, clipped, smoothed), as its detect stage finds them."""
    opts = Options(quiet=True, **options)
    if opts.fixed_box:
        return [Box.from_tblr(opts.box)]
    return sync.face_boxes(FrameSource(video.probe(face), opts, sync.hp.fps), opts, n_frames)


def region_psnr(
    want: list[np.ndarray], got: list[np.ndarray], want_boxes: list[Box | None], got_boxes: list[Box | None]
) -> tuple[float, int, int]:
    """(PSNR in dB over the pasted faces, frames compared, largest box difference in px).

    Frames whose boxes differ (by up to a pixel, which S3FD on another device may give) hold faces
    resized to other sizes and are not compared; a frame without a face is compared whole.
    """
    if len(want) != len(got) or want[0].shape != got[0].shape:
        raise Failed(f"{len(got)} frames of {got[0].shape} against the CPU's {len(want)} of {want[0].shape}")
    squares, count, compared, worst = 0.0, 0, 0, 0
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        box_a, box_b = want_boxes[i % len(want_boxes)], got_boxes[i % len(got_boxes)]
        if (box_a is None) != (box_b is None):
            raise Failed(f"frame {i}: a face on one device only ({box_a} against {box_b})")
        if box_a is not None:
            worst = max(worst, *(abs(x - y) for x, y in zip(box_a, box_b, strict=True)))
            if box_a != box_b:
                continue
            a, b = a[box_a.y1 : box_a.y2, box_a.x1 : box_a.x2], b[box_a.y1 : box_a.y2, box_a.x1 : box_a.x2]
        diff = a.astype(np.float64) - b
        squares, count, compared = squares + float((diff * diff).sum()), count + diff.size, compared + 1
    psnr = math.inf if squares == 0 else 10 * math.log10(255.0**2 * count / squares)
    return psnr, compared, worst


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """Convolutions and matmuls in full float32 on CUDA (PyTorch lets cuDNN use TF32 by default)."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def compare_inference(run: Run, fp16: bool, detect: bool) -> tuple[str, dict]:
    """The device's frames (and boxes) against the CPU's on the same clip and weights."""
    if fp16 and not run.cuda:
        raise Skip("--fp16 needs CUDA")
    face, speech = run.clip
    options = {} if detect else {"box": run.center_box(face)}
    path = "detect" if detect else "box"
    if path not in run.references:  # computed once for fp32 and fp16
        ref = run.sync("cpu")
        frames = lipsync_frames(ref, face, speech, run.tmp / f"cpu-{path}.mp4", **options)
        run.references[path] = frames, pasted_boxes(ref, face, len(frames), **options)
    want, want_boxes = run.references[path]
    dev, tag = run.sync(run.device, fp16), f"{'fp16' if fp16 else 'fp32'}-{path}"
    got = lipsync_frames(dev, face, speech, run.tmp / f"dev-{tag}.mp4", **options)
    got_boxes = pasted_boxes(dev, face, len(got), **options)
    psnr, compared, worst = region_psnr(want, got, want_boxes, got_boxes)
    data = {"psnr_db": psnr, "frames": len(want), "frames_compared": compared, "box_max_diff_px": worst,
            "faces": sum(b is not None for b in want_boxes), "threshold_db": PSNR_DB[fp16]}  # fmt: skip
    figure = f"PSNR {psnr:.1f} dB over {compared}/{len(want)} frames' faces, boxes within {worst} px"
    if worst > BOX_TOLERANCE_PX or compared < len(want) / 2:
        raise Failed(f"boxes differ by up to {worst} px; {figure}", data)
    if psnr < PSNR_DB[fp16]:
        if run.cuda and not fp16:  # say at once whether TF32 convolutions are the cause
            with tf32_off():
                strict = lipsync_frames(dev, face, speech, run.tmp / f"dev-{tag}-fp32.mp4", **options)
            data["psnr_db_tf32_off"] = region_psnr(want, strict, want_boxes, got_boxes)[0]
            figure += f" (TF32 off: {data['psnr_db_tf32_off']:.1f} dB)"
        raise Failed(f"{figure} < {PSNR_DB[fp16]:.0f} dB", data)
    return figure, data


def step_s3fd_boxes(run: Run) -> tuple[str, dict]:
    """S3FD's top box per frame on the device against the CPU's, batch for batch."""
    face, _ = run.clip
    batches = [np.stack(list(video.iter_frames(face))[:16])]
    if run.sizes is FULL:
        image = video.read_image(FACE_IMAGE)
        batches.append(np.stack([image, image[:, ::-1]]))

    def detector(device: torch.device | str) -> face_detection.FaceAlignment:
        return face_detection.FaceAlignment(face_detection.LandmarksType._2D, flip_input=False, device=device,
                                            path_to_detector=run.s3fd_weights)  # fmt: skip

    want = [box for batch in batches for box in detector("cpu").get_detections_for_batch(batch)]
    got = [box for batch in batches for box in detector(run.device).get_detections_for_batch(batch)]
    if [b is None for b in want] != [b is None for b in got]:
        raise Failed(f"faces found in other frames: CPU {want}, device {got}")
    diffs = [max(abs(x - y) for x, y in zip(a, b, strict=True)) for a, b in zip(want, got, strict=True) if a]
    worst = max(diffs, default=0)
    data = {"boxes": len(want), "faces": len(diffs), "max_diff_px": worst, "cpu": want, "device": got}
    figure = f"{len(diffs)}/{len(want)} faces, boxes within {worst} px of the CPU's"
    if not diffs:
        raise Failed("no face found on either device: the comparison proves nothing", data)
    if worst > BOX_TOLERANCE_PX:
        raise Failed(figure, data)
    return figure, data


# --- out-of-memory: the batch halves and the frames stay the same --------------------------------------------


def fill_card(device: torch.device, leave: int) -> list[torch.Tensor]:
    """Blocks taking all but about `leave` bytes of the card's free memory."""
    blocks: list[torch.Tensor] = []
    request = None
    for _ in range(32):
        free = torch.cuda.mem_get_info(device)[0]
        request = free - leave if request is None else min(request, free - leave)
        if request < 64 << 20:
            break
        try:
            blocks.append(torch.empty(request, dtype=torch.uint8, device=device))
        except torch.OutOfMemoryError:
            request //= 2
    return blocks


@contextlib.contextmanager
def card_full(sync: lipsync.LipSync, frames_fit: int) -> Iterator[str]:
    """The card filled but for `frames_fit` frames of the generator's peak memory per frame."""
    gen, device, size = sync.generator, sync.generator.device, sync.hp.img_size
    probe = 16
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    gen.predict(np.zeros((probe, size, size, 3), np.uint8), np.zeros((probe, 1, 80, 16), np.float32))
    per_frame = max(1, (torch.cuda.max_memory_allocated(device) - base) // probe)
    torch.cuda.empty_cache()
    blocks = fill_card(device, per_frame * frames_fit)
    try:
        free = torch.cuda.mem_get_info(device)[0]
        yield f"{per_frame / 2**20:.1f} MiB a frame, {free / 2**20:.0f} MiB left free"
    finally:
        del blocks
        torch.cuda.empty_cache()


@contextlib.contextmanager
def simulated_oom(sync: lipsync.LipSync, frames_fit: int) -> Iterator[str]:
    """On a CPU: the generator raises torch's out-of-memory error above `frames_fit` frames."""
    predict = sync.generator.predict

    def limited(faces: np.ndarray, mels: np.ndarray) -> np.ndarray:
        if len(faces) > frames_fit:
            raise torch.OutOfMemoryError(f"simulated: {len(faces)} frames")
        return predict(faces, mels)

    sync.generator.predict = limited
    try:
        yield f"simulated above {frames_fit} frames"
    finally:
        del sync.generator.predict


def step_oom(run: Run) -> tuple[str, dict]:
    """A batch far too large for the memory left: `Generator.limit` halves and the frames stay the same."""
    face, speech = run.clip
    box = run.center_box(face)
    sync = lipsync.LipSync(
        ModelOptions(checkpoint_path=run.wav2lip_checkpoint, device=str(run.device)), quiet=True
    )  # a batch limit of its own
    want = lipsync_frames(sync, face, speech, run.tmp / "oom-ref.mp4", box=box)
    first = batch_sizes(len(want), HUGE_BATCH, generator_workers(run.device)[0])[0]
    fit = max(2, first // OOM_SHRINK)
    with card_full(sync, fit) if run.cuda else simulated_oom(sync, fit) as pressure:
        got = lipsync_frames(sync, face, speech, run.tmp / "oom.mp4", box=box, wav2lip_batch_size=HUGE_BATCH)
    size = sync.generator.limit.size
    boxes = [Box.from_tblr(box)]
    psnr = region_psnr(want, got, boxes, boxes)[0]
    same = all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
    data = {"first_batch": first, "batch_limit": size, "identical": same, "psnr_db": psnr, "pressure": pressure}
    figure = f"batch {first} -> {size} ({pressure}); frames {'identical' if same else f'PSNR {psnr:.1f} dB'}"
    if size >= first:
        raise Failed(f"no out-of-memory: a batch of {first} fit ({pressure})", data)
    if psnr < PSNR_DB[False]:
        raise Failed(figure, data)
    if not run.cuda:
        raise Skip(f"no real out-of-memory on a CPU; {figure}", data)
    return figure, data


# --- evaluation ------------------------------------------------------------------------------------------


def step_lse(run: Run) -> tuple[str, dict]:
    """LSE-D/LSE-C of the test video on the device against the CPU (the same decoded frames and audio)."""
    if not LSE_VIDEO.is_file():
        raise Failed(f"{LSE_VIDEO} is missing (the LSE test video)")
    frames, audio = media.read_frames(LSE_VIDEO, lse.FRAME_SIZE), media.read_audio(LSE_VIDEO)
    if run.sizes.lse_frames:
        n = run.sizes.lse_frames
        frames, audio = frames[:n], audio[: n * lse.SAMPLES_PER_FRAME]
    model = S()
    copy_parameters(model, det_state_dict("syncnet_python_S"))
    want = lse.evaluate_clip(model.eval(), frames, audio)
    got = lse.evaluate_clip(model.to(run.device), frames, audio)
    rel = max(abs(g / w - 1) for g, w in zip(got.mean_dists, want.mean_dists, strict=True))
    # LSE-C is a difference of two mean distances, so its error is bounded relative to them, not to itself
    c_err = abs(got.lse_c - want.lse_c) / max(abs(want.lse_c), want.lse_d)
    data = {"cpu": want.as_row(), "device": got.as_row(), "frames": len(frames), "max_rel_diff_dists": rel,
            "lse_c_err": c_err}  # fmt: skip
    figure = f"LSE-D {got.lse_d:.4f} / CPU {want.lse_d:.4f}, LSE-C {got.lse_c:.4f} / {want.lse_c:.4f}"
    if got.offset != want.offset or rel > LSE_RTOL or c_err > LSE_RTOL:
        raise Failed(f"{figure}, offset {got.offset} / {want.offset}, distances within {rel:.1e}", data)
    return f"{figure}, distances within {rel:.1e}", data

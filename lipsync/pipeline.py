"""Lip-sync a face video (or image) to any speech: the inference pipeline of Wav2Lip, and its Python API.

How a frame flows, stage by stage (each a module of its own; `LipSync.__call__` composes them):

    decode          frames.FrameSource       the face input's frames, prepared (resize, rotate, crop)
    detect, smooth  face_boxes.FaceBoxes     one face box per video frame, in a first pass (cached)
    mel windows     audio.load_speech        the speech's mel window of each output frame
    crop            crops.make_batches       the face crops of consecutive output frames, in batches
    generate        generation.Generator     Wav2Lip over the batches, on worker threads
    enhance         enhance.Enhance          optional: super-resolution, the source crops' parse (same workers)
    paste           crops.paste_batches      each generated face back into its frame (through the parse's mask)
    encode          video.VideoWriter        H.264 + AAC, renamed into place once complete

Every stage after the first pass streams (an iterator in, an iterator out), so only a few batches are in
memory whatever the length of the clip. Decoding and cropping run on a thread of their own, generation
on worker threads, pasting and encoding on the calling thread.

With default options the mouth region is the original's computation. Where we differ, on purpose:
- the output covers the whole audio (ceil(duration·fps) frames; frames past the original's last mel window
  use that window, flush with the end of the mel); the original stops up to 4 frames short;
- a frame without a face passes through unchanged by default (`no_face="keep"`) instead of aborting;
- `resize_factor`, `rotate` and `crop` also apply to a still image (the original ignored them there);
- a variable-frame-rate video is read on a constant timeline at its average rate (`video.iter_frames`).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import audio
from common import video
from common.atomic_files import check_writable
from common.devices import select_device, select_dtype, tune_cpu_allocator
from common.errors import UserError
from hparams import HParams, hparams
from lipsync.crops import feather_mask, make_batches, paste_batches
from lipsync.enhance import Enhanced, load_enhance
from lipsync.face_boxes import FaceBoxes
from lipsync.frames import FrameSource, loop_frames
from lipsync.generation import Generator, Wav2LipTorch, generator_workers
from lipsync.idle import IdleFrames, frame_weights
from lipsync.options import DEFAULT_OUTFILE, ModelOptions, Options
from lipsync.threads import Report, background, progress

OnFrame = Callable[[int, np.ndarray], None]
PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Summary:
    """What a run did; `line()` is the one-line report the command line prints."""

    outfile: Path
    frames: int
    duration: float  # seconds of output video
    elapsed: float  # seconds the run took
    device: str
    missing: int = 0  # output frames without a face (passed through unchanged)
    missing_ranges: list[tuple[float, float]] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed if self.elapsed > 0 else float("inf")

    def line(self) -> str:
        ranges = ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in self.missing_ranges)
        faces = f"no face in {self.missing} frames ({ranges})" if self.missing else "a face in every frame"
        return (
            f"{self.frames} frames ({self.duration:.2f} s) in {self.elapsed:.1f} s, {self.fps:.1f} frames/s "
            f"on {self.device}; {faces}; wrote {self.outfile}"
        )


def missing_ranges(missing: Sequence[bool], fps: float) -> list[tuple[float, float]]:
    """Time ranges (start, end) in seconds of the runs of frames flagged in `missing`."""
    ranges, start = [], None
    for i, flag in enumerate([*missing, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            ranges.append((start / fps, i / fps))
            start = None
    return ranges


def encode(
    frames: Iterable[tuple[np.ndarray, bool]], writer: video.VideoWriter, on_frame: OnFrame | None
) -> list[bool]:
    """The encode stage: every frame into `writer`; returns, per frame, whether it lacked a face."""
    missing = []
    for frame, has_face in frames:
        if on_frame is not None:
            on_frame(writer.n_frames, frame)
        missing.append(not has_face)
        writer.write(frame)
    return missing


class LipSync:
    """The generator (and, when first needed, the face detector) loaded once, for any number of clips.

    sync = LipSync(ModelOptions(checkpoint_path="checkpoints/wav2lip_gan.pth"))   # or LipSync("...pth")
    for face, speech, out in jobs:
        print(sync(face, speech, out).line())

    `model` holds what is loaded once (`options.ModelOptions`: weights, device, backend, cache folder); a
    path stands for `ModelOptions(checkpoint_path=path)`. `detector`: any object with face_detection's
    `get_detections_for_batch`, instead of S3FD. `backend="onnxruntime"` runs the generator and S3FD in
    ONNX Runtime, from `onnx_path` and `detector_onnx_path`, or from exports of the weights made once into
    `cache_dir`/onnx (onnx_models.py).
    """

    def __init__(
        self, model: ModelOptions | str | Path, *, detector: object | None = None, hp: HParams = hparams,
        quiet: bool = False,
    ) -> None:  # fmt: skip
        model = model if isinstance(model, ModelOptions) else ModelOptions(checkpoint_path=str(model))
        self.model, self.hp, self.backend = model, hp, model.backend
        self.device = select_device(model.device)
        self.dtype, note = select_dtype(model.precision, self.device, model.force_precision)
        if self.dtype != torch.float32 and model.backend != "torch":
            raise UserError(f"--precision {model.precision} runs with --backend torch only")
        if not quiet:
            how = " with ONNX Runtime" if model.backend == "onnxruntime" else f" in {PRECISION_NAMES[self.dtype]}"
            print(f"Using {self.device} for inference{how}." + (f" Note: {note}." if note else ""), file=sys.stderr)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self._forward_pass = forward = self._forward(model, quiet)
        self.enhance = load_enhance(model, self.device, self.dtype, generator_workers(self.device)[1], quiet)
        self.generator = Generator(
            Enhanced(forward.scaled, self.enhance) if self.enhance else forward, self.device, quiet,
            enhance=self.enhance or None, extra_bytes=self.enhance.bytes_per_frame(hp.img_size) if self.enhance else 0,
        )  # fmt: skip
        factory = (lambda _max_side: detector) if detector is not None else self._s3fd_factory(model, quiet)
        detector_file = model.detector_onnx_path or detector_weights(model.detector_path)
        self.face_boxes = FaceBoxes(factory, Path(detector_file), model.cache_dir, quiet, PRECISION_NAMES[self.dtype])

    def ready(self) -> None:
        """Wait for the generator's weights, which load on a thread of their own from `__init__` on: a wrong
        or unsafe checkpoint raises here, once, before any clip's detection or a caller's per-clip work."""
        getattr(self._forward_pass, "ready", lambda: None)()

    def _forward(self, model: ModelOptions, quiet: bool) -> Wav2LipTorch:
        """Wav2Lip's forward pass for the generate stage, in PyTorch or ONNX Runtime."""
        if model.backend == "onnxruntime":
            from common.onnx_export import onnx_file
            from lipsync.onnx_models import SPECS, OnnxWav2Lip

            path = onnx_file(SPECS["wav2lip"], model.onnx_path, model.checkpoint_path, model.cache_dir, quiet)
            return OnnxWav2Lip(path, self.device)  # type: ignore[return-value]  # the same interface
        return Wav2LipTorch(model.checkpoint_path, self.device, self.dtype, model.cache_dir)

    def _s3fd_factory(self, model: ModelOptions, quiet: bool) -> Callable[[int | None], object]:
        """S3FD on first use, in the run's dtype (its L2 normalisations, heads, decoding and NMS in float32);
        with the ONNX backend, its forward pass in ONNX Runtime (one session for every `max_side`)."""

        @functools.cache
        def network() -> object:
            from lipsync.onnx_models import s3fd_network

            weights = detector_weights(model.detector_path)
            return s3fd_network(model.detector_onnx_path, model.cache_dir, quiet, weights, self.device)

        def build(max_side: int | None) -> object:
            import face_detection

            return face_detection.FaceAlignment(
                face_detection.LandmarksType._2D, flip_input=False, device=self.device,
                path_to_detector=model.detector_path, max_side=max_side,
                network=network() if model.backend == "onnxruntime" else None, dtype=self.dtype,
            )  # fmt: skip

        return build

    def __call__(
        self,
        face: str | Path,
        audio_path: str | Path,
        outfile: str | Path = DEFAULT_OUTFILE,
        *,
        on_frame: OnFrame | None = None,
        on_progress: Report | None = None,
        **options,
    ) -> Summary:
        """Lip-sync `face` (video or image) to the speech of `audio_path` into `outfile`.

        `options` are the fields of `options.Options`. `on_frame(i, frame_bgr)` sees every output frame
        before it is encoded (the exact pixels, for tests and previews). `on_progress(stage, done, total)`
        follows the stages ("detect faces", then "lip-sync" frame by frame); raising from it cancels the
        run, which then leaves no output file.
        """
        opts = Options(**options)
        self.enhance.check(opts)
        started = time.perf_counter()
        outfile = Path(outfile)
        check_writable(outfile.parent, "--outfile")
        source = FrameSource(video.probe(face), opts, self.hp.fps)
        speech = audio.load_speech(audio_path, source.fps, self.hp, opts.audio_range)
        self.ready()  # the weights loaded beside the probe and the speech; their error before detection's
        n_out = speech.n_frames
        boxes = self.face_boxes(source, opts, n_out, on_progress)

        cap, sizes = self.generator.plan(n_out, opts, source.frame_bytes)
        items = ((frame, boxes[index % len(boxes)], speech.starts[i])
                 for i, (index, frame) in enumerate(loop_frames(source, n_out, source.static)))  # fmt: skip
        idle = IdleFrames(frame_weights(speech, opts, source.fps))  # --idle keep: silent frames keep the source
        batches = background(make_batches(idle.hold(items), self.hp.img_size, sizes))
        generated = self.generator(batches, speech.mel, cap, opts)
        mask = feather_mask(self.hp.img_size) if opts.blend == "feather" else None
        pasted = idle.fade(paste_batches(generated, mask, source.static, self.enhance.paster(opts, mask)))
        height, width = source.shape[:2]
        writer = video.VideoWriter(outfile, source.writer_fps, width, height, audio_path, audio_gain=speech.gain,
                                   audio_span=opts.audio_range)  # fmt: skip
        with writer:
            missing = encode(progress(pasted, n_out, "lip-sync", opts.quiet, on_progress), writer, on_frame)
        return Summary(outfile, n_out, n_out / source.fps, time.perf_counter() - started, str(self.device),
                       sum(missing), missing_ranges(missing, source.fps))  # fmt: skip


def detector_weights(detector_path: str | Path | None) -> Path:
    """The S3FD weights file the detector reads (part of the detection cache's key)."""
    from face_detection.detection.sfd.sfd_detector import default_weights_path

    return Path(detector_path) if detector_path is not None else default_weights_path()


def lipsync(
    face: str | Path, audio_path: str | Path, model: ModelOptions | str | Path,
    outfile: str | Path = DEFAULT_OUTFILE, *, hp: HParams = hparams, **options,
) -> Summary:  # fmt: skip
    """Lip-sync one clip: `LipSync(model, hp=hp)(face, audio_path, outfile, **options)`."""
    return LipSync(model, hp=hp, quiet=options.get("quiet", False))(face, audio_path, outfile, **options)

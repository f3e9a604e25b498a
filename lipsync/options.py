"""The inference options, declared once.

Each option is a field of `Options` (what may change from one clip to the next) or of `ModelOptions`
(what is loaded once and shared by every clip): its name, type, default, help and choices stand here and
nowhere else. The command lines (`inference.py`, `realtime.py`, `app.py`,
`evaluation/gen_videos_from_filelist.py`) build their parsers from these fields with `add_arguments`; the
Python API takes the dataclasses themselves (`LipSync(ModelOptions(...))`) and checks a clip's keyword
arguments by constructing `Options`, so a default or a check can never differ between the two. Defaults
reproduce the original inference.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.devices import PRECISIONS
from common.errors import UserError
from common.flags import add_arguments, flag_fields, from_namespace, option
from common.time_ranges import TimeRange

__all__ = ["ModelOptions", "Options", "add_arguments", "from_namespace"]  # the flags' builders, for the scripts

DEFAULT_OUTFILE = "results/result_voice.mp4"
UNSET_REGION = (-1, -1, -1, -1)  # the original's "no --box" value
NO_FACE_CHOICES = ("keep", "last", "error")
BLEND_CHOICES = ("paste", "feather")
HQ_MODES = ("fork", "soft")  # with --sr_path / --segmentation_path: Wav2Lip-HQ's output exactly, or ours (README, "HQ")
ENHANCER_CHOICES = ("none", "gfpgan", "codeformer", "sharpen")  # the restore step (README, "Restoration")
MASK_REGIONS = ("face", "lower_face", "mouth")  # what the face parser's mask lets through (lipsync/face_masks.py)
IDLE_CHOICES = ("generate", "keep")  # during silence: the generator's mouth (the original), or the source face
SILENCE_DB = -50.0  # RMS of a frame's 200 ms window, dB full scale: below it the frame is silence (both doors)
DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
BACKEND_CHOICES = ("torch", "onnxruntime")  # what runs the networks (README, "ONNX")
REGION_FIELDS = ("pads", "crop", "box")  # four integers: top, bottom, left, right
PRECISION_FLAGS = ("precision", "fp16", "force_precision")  # ModelOptions' flags a script running any network takes


def check_choices(settings: object, skip: tuple[str, ...] = ()) -> None:
    """A `UserError` naming the flag when a field declared with choices holds another value."""
    for f in flag_fields(type(settings)):
        allowed = f.metadata["choices"] if f.name not in skip else None
        if allowed and getattr(settings, f.name) not in allowed:
            raise UserError(f"--{f.name} {getattr(settings, f.name)}: choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Options:
    """How to lip-sync one clip. Constructing it checks every value (a `UserError` naming the flag)."""

    static: bool = option(False, "use only the first video frame (an image always is)", legacy_bool=True)
    fps: float | None = option(None, "frame rate for an image input (default: hparams' fps, 25)")
    pads: tuple[int, ...] = option(
        (0, 10, 0, 0), "padding of the face box (top, bottom, left, right); include the chin at least"
    )
    face_det_batch_size: int = option(16, "batch size for face detection")
    wav2lip_batch_size: int | None = option(
        None, "batch size for the generator (default: 128 on a GPU, 16 on a CPU, where it is faster)"
    )
    resize_factor: int = option(1, "shrink the frames by this factor first (480p or 720p often give the best results)")
    crop: tuple[int, ...] = option(
        (0, -1, 0, -1), "crop the frames (top, bottom, left, right) after --resize_factor and --rotate; -1: the edge"
    )
    box: tuple[int, ...] = option(
        UNSET_REGION, "a constant face box (top, bottom, left, right) instead of face detection"
    )
    rotate: bool = option(False, "turn the frames right by 90 degrees")
    nosmooth: bool = option(False, "do not smooth the face boxes over 5 frames")
    no_face: str = option(
        "keep", "frames without a face: keep them unchanged (default), reuse the last box, or stop",
        choices=NO_FACE_CHOICES,
    )  # fmt: skip
    det_max_side: int | None = option(
        None, "detect faces on frames shrunk to this longest side (e.g. 640); faster on large videos"
    )
    det_every: int = option(1, "detect on every K-th frame only, interpolating the boxes in between")
    blend: str = option(
        "paste", "paste the generated face (original) or feather its lower half into the frame", choices=BLEND_CHOICES
    )
    hq_mode: str = option(
        "fork", "with --sr_path or --segmentation_path: fork = Wav2Lip-HQ's output exactly (a hard mask at "
        "512x512, the whole box rewritten); soft = a feathered mask, pixels outside it untouched, anti-aliased "
        "shrinking of the super-resolved face, any ESRGAN scale", choices=HQ_MODES,
    )  # fmt: skip
    mask_region: str = option(
        "face", "with --segmentation_path: the parsed regions that take the generated face: skin, mouth and lips "
        "(the fork's), the same below the middle of the box only, or mouth and lips only", choices=MASK_REGIONS,
    )  # fmt: skip
    fidelity_weight: float = option(
        0.5, "with --enhancer codeformer: 0 takes the most restored face from CodeFormer's prior, 1 the face most "
        "faithful to the generated one (CodeFormer's -w)",
    )  # fmt: skip
    sharpen_amount: float = option(1.0, "with --enhancer sharpen: the unsharp mask's strength (0: none)")
    idle: str = option(
        "generate", "frames whose 200 ms of audio is silent (--silence_db): generate them (the original) or keep "
        "the source face, fading in and out of speech", choices=IDLE_CHOICES,
    )  # fmt: skip
    silence_db: float = option(
        SILENCE_DB, "a frame whose 200 ms of audio is quieter than this (RMS, dB full scale) is silence"
    )
    # time ranges (README, "Time ranges and URLs"): seconds or HH:MM:SS.ms, exact fractions (common/time_ranges.py)
    start: str | float | None = option(
        None, "use the face video from this time on (seconds, or HH:MM:SS.ms): its first frame at or after it"
    )
    end: str | float | None = option(
        None, "use the face video up to this time (a frame at it excluded); the output still covers the speech, "
        "the range looping",
    )  # fmt: skip
    audio_start: str | float | None = option(None, "use the speech from this time on (seconds, or HH:MM:SS.ms)")
    audio_end: str | float | None = option(None, "use the speech up to this time (seconds, or HH:MM:SS.ms)")
    memory_budget: int = option(
        384, "MiB of decoded frames in flight between the stages; batches shrink to fit it on huge frames (4K)"
    )
    quiet: bool = option(False, "no progress bars and no summary")

    def __post_init__(self) -> None:
        for name in REGION_FIELDS:
            values = tuple(getattr(self, name))
            if len(values) != 4:
                raise UserError(f"--{name} takes 4 integers (top, bottom, left, right), got {list(values)}")
            object.__setattr__(self, name, values)
        check_choices(self)
        positive = ("resize_factor", "det_every", "face_det_batch_size", "wav2lip_batch_size", "det_max_side", "fps",
                    "memory_budget")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"--{name} must be positive, got {value}")
        _ = self.face_range, self.audio_range  # parsed now: a malformed time fails before any work
        if not 0 <= self.fidelity_weight <= 1:
            raise UserError(f"--fidelity_weight must be between 0 and 1, got {self.fidelity_weight}")
        if not self.sharpen_amount >= 0:
            raise UserError(f"--sharpen_amount must be 0 or more, got {self.sharpen_amount}")

    @property
    def face_range(self) -> TimeRange:
        """`start`/`end` as exact seconds (the face video's part that is used)."""
        return TimeRange.of(self.start, self.end, ("--start", "--end"))

    @property
    def audio_range(self) -> TimeRange:
        """`audio_start`/`audio_end` as exact seconds (the speech's part that is used)."""
        return TimeRange.of(self.audio_start, self.audio_end, ("--audio_start", "--audio_end"))

    @property
    def fixed_box(self) -> bool:
        return self.box != UNSET_REGION

    def frames_within_budget(self, frame_bytes: int, share: int = 1) -> int:
        """How many frames of `frame_bytes` fit in `1/share` of the memory budget (at least one)."""
        return max(1, (self.memory_budget << 20) // (max(1, frame_bytes) * share))


@dataclass(frozen=True)
class ModelOptions:
    """What is loaded once for many clips: the networks, on one device."""

    checkpoint_path: str = option(None, "Wav2Lip checkpoint (wav2lip.pth / wav2lip_gan.pth)")
    device: str = option("auto", "auto: cuda, then mps, then cpu", choices=DEVICE_CHOICES)
    precision: str = option(
        "fp32", "the networks' arithmetic: fp32 (exact, the default), bf16 (CUDA, and CPUs with AVX512-BF16 or "
        "AMX: about twice as fast) or fp16 (CUDA)", choices=PRECISIONS,
    )  # fmt: skip
    fp16: bool = option(False, "the same as --precision fp16 (the earlier flag)")
    force_precision: bool = option(False, "run --precision bf16 even on a CPU without bf16 instructions (slower)")
    detector_path: str | None = option(None, "S3FD weights (default: face_detection/detection/sfd/s3fd.pth)")
    backend: str = option(
        "torch", "run the generator and S3FD in PyTorch, or in ONNX Runtime from .onnx files", choices=BACKEND_CHOICES
    )
    onnx_path: str | None = option(
        None, "with --backend onnxruntime: the generator's .onnx (default: exported from --checkpoint_path, cached)"
    )
    detector_onnx_path: str | None = option(
        None, "with --backend onnxruntime: S3FD's .onnx (default: exported from the S3FD weights, cached)"
    )
    cache_dir: str | None = option(
        None, "a folder for what is worth keeping between runs: face boxes by the video's content (boxes/), "
        "face parses by the crop's content (parsing/) and ONNX exports (onnx/)",
    )  # fmt: skip
    sr_path: str | None = option(
        None, "Wav2Lip-HQ: ESRGAN weights (esrgan_yunying.pth, RealESRGAN_x4plus.pth) to super-resolve each "
        "generated face before it is pasted",
    )  # fmt: skip
    segmentation_path: str | None = option(
        None, "Wav2Lip-HQ: face-parser weights (face_segmentation.pth = face-parsing.PyTorch's 79999_iter.pth): "
        "only the skin, mouth and lips of the source face are replaced (--mask_region, --hq_mode)",
    )  # fmt: skip
    sr_onnx_path: str | None = option(
        None, "with --backend onnxruntime: ESRGAN's .onnx (default: exported from --sr_path, cached)"
    )
    segmentation_onnx_path: str | None = option(
        None, "with --backend onnxruntime: the face parser's .onnx (default: exported from --segmentation_path, cached)"
    )
    enhancer: str = option(
        "none", "restore each generated face before it is pasted: gfpgan (GFPGAN v1.4), codeformer (CodeFormer, "
        "--fidelity_weight) or sharpen (an unsharp mask, no weights, --sharpen_amount)", choices=ENHANCER_CHOICES,
    )  # fmt: skip
    enhancer_path: str | None = option(
        None, "the restorer's weights (default: checkpoints/GFPGANv1.4.pth or checkpoints/codeformer.pth)"
    )
    enhancer_onnx_path: str | None = option(
        None, "with --backend onnxruntime: the restorer's .onnx (default: exported from --enhancer_path, cached)"
    )

    def __post_init__(self) -> None:
        check_choices(self, skip=("device",))  # `select_device` checks it, a torchrun rank's cuda:N included
        if self.fp16:
            if self.precision not in ("fp32", "fp16"):
                raise UserError(f"--fp16 and --precision {self.precision} disagree; give one of them")
            object.__setattr__(self, "precision", "fp16")

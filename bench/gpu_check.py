"""Check every CUDA path against the CPU and time it, in one command that ends within 5 minutes.

    python -m bench.gpu_check [--out results/gpu_check.json] [--quick] [--device cuda]
    python -m bench.gpu_check --only "oom,lse"          # rerun some steps (names containing these)
    python -m bench.gpu_check --device cpu --allow_cpu   # the same steps on the CPU, tiny sizes (CI)

Each step runs on its own and a failure is reported as FAIL with a one-line reason while the others still
run; the deterministic weights of tools/detweights.py and synthetic media stand in for real ones:
- inference (`LipSync`), fp32 and `--fp16`, with `--box` and with detection: the device's frames against
  the CPU's (PSNR over the pasted faces >= 45 dB in fp32, >= 35 dB in fp16), S3FD's boxes within 1 px;
- out-of-memory: the card filled but for a few frames, a batch far too large halves (`Generator.limit`)
  and the frames stay the same;
- LSE-D/LSE-C of the test video, device against CPU (rtol 1e-4);
- 20 steps of each trainer with `--amp` bf16 and fp16, and of DDP under torchrun over the GPUs present:
  losses finite, checkpoints load on the CPU;
- timings: the generator alone at batch 1, 16, 128 in fp32 and fp16, S3FD frames/s at 1080p, the whole
  `inference.py` command on a 1080p clip with detection and with `--box`, and training step times.

It prints one table (step, status, figure, time), writes the JSON atomically and exits 1 if a step failed.
A time budget (default 270 s) skips the steps it cannot cover. Without CUDA it says so in one line and
exits 0, having imported every module the steps use.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python bench/gpu_check.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import csv
import io
import itertools
import json
import math
import platform
import re
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import face_detection
from bench import train_step
from bench.gpu_steps import (
    FULL,
    QUICK,
    Failed,
    Run,
    Skip,
    compare_inference,
    run_command,
    step_lse,
    step_oom,
    step_s3fd_boxes,
)
from common import video
from common.atomic_files import write_text_atomic
from common.devices import BatchLimit, in_chunks
from common.errors import UserError, run_cli
from common.weights import load_weights
from lipsync.options import Options
from models import SyncNet_color, Wav2Lip, Wav2Lip_disc_qual

NO_CUDA = "no CUDA device: nothing to check (the script imports and parses)"
DEFAULT_BUDGET = 270.0  # seconds: with start-up and the report, the run ends within 5 minutes
MAX_ROUNDS = 200  # generator calls per timing at most (batch 1)
StepFn = Callable[[Run], tuple[str, dict]]


@dataclass(frozen=True)
class Step:
    name: str
    fn: StepFn
    estimate: float  # seconds it needs on a GPU: it is skipped when less of the budget is left


@dataclass
class Outcome:
    step: str
    status: str  # PASS, FAIL or SKIP
    figure: str  # what was measured, or why it failed or was skipped (one line)
    seconds: float
    data: dict = field(default_factory=dict)


# --- training --------------------------------------------------------------------------------------------


def read_log(folder: Path) -> dict[str, list[float]]:
    """The trainer's log.csv: values by tag."""
    values: dict[str, list[float]] = {}
    with open(folder / "log.csv") as f:
        for row in csv.DictReader(f):
            values.setdefault(row["tag"], []).append(float(row["value"]))
    return values


def check_checkpoint(path: Path, model: Callable[[], torch.nn.Module], arch: str, steps: int) -> None:
    """The checkpoint loads on the CPU into a fresh model, at the right step, with finite weights."""
    container = load_weights(model(), path, arch)
    if container.get("global_step") != steps:
        raise Failed(f"{path.name}: global_step {container.get('global_step')}, expected {steps}")
    bad = [k for k, v in container["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise Failed(f"{path.name}: non-finite weights in {bad[:3]}")


def train(run: Run, script: str, amp: str, launcher: tuple[str, ...] = (), processes: int = 1) -> tuple[str, dict]:
    """`script` for the sizes' steps with `--amp amp`; losses finite, checkpoints load on the CPU."""
    gan = script == "wav2lip_train.py"
    folder = run.tmp / f"train-{Path(script).stem}-{amp}{'-torchrun' if launcher else ''}"  # a fresh log.csv each
    steps = run.sizes.train_steps
    cmd = [sys.executable, *launcher, script, "--data_root", str(run.dataset), "--filelists_dir",
           str(run.dataset / "filelists"), "--checkpoint_dir", str(folder), "--hparams", f"@{run.train_config}",
           "--no_tqdm", "--num_workers", "0", "--max_steps", str(steps), "--eval_steps", "1", "--log_interval", "1",
           "--amp", amp, "--device", "cuda" if launcher and run.cuda else str(run.device)]  # fmt: skip
    if gan:
        cmd += ["--syncnet_checkpoint_path", str(run.expert_checkpoint), "--gan"]
    run_command(cmd, run.remaining())
    log = read_log(folder)
    bad = [f"{tag}={v}" for tag, values in log.items() for v in values if not math.isfinite(v)]
    if bad:
        raise Failed(f"non-finite losses: {', '.join(bad[:4])}")
    final = f"checkpoint_step{steps:09d}.pth"  # the original's names
    if gan:
        check_checkpoint(folder / final, Wav2Lip, "Wav2Lip", steps)
        check_checkpoint(folder / f"disc_{final}", Wav2Lip_disc_qual, "Wav2Lip_disc_qual", steps)
    else:
        check_checkpoint(folder / final, SyncNet_color, "SyncNet_color", steps)
    losses = [t for t in ("train/loss", "train/l1", "train/sync_loss", "train/perceptual") if t in log]
    if len(log[losses[0]]) != steps:
        raise Failed(f"{len(log[losses[0]])} logged steps of {steps}")
    rate = float(np.median(log["train/samples_per_s"]))
    data = {"steps": steps, "processes": processes, "last": {t: log[t][-1] for t in losses}, "samples_per_s": rate}
    shown = ", ".join(f"{t.split('/')[1]} {log[t][-1]:.3f}" for t in losses)
    return f"{steps} steps x {processes} process(es): {shown}; checkpoints load on the CPU", data


def step_train(script: str, amp: str) -> Callable[[Run], tuple[str, dict]]:
    def step(run: Run) -> tuple[str, dict]:
        if not run.cuda:
            if amp != "bf16":
                raise Skip(f"--amp {amp} needs CUDA")
            figure, data = train(run, script, amp)
            raise Skip(f"AMP is CUDA-only: ran in float32 on the CPU; {figure}", data)
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            raise Skip(f"{torch.cuda.get_device_name(run.device)} has no bfloat16")
        return train(run, script, amp)

    return step


def step_ddp(run: Run) -> tuple[str, dict]:
    """The generator with the discriminator under torchrun, one process per GPU (nccl when more than one)."""
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node")
    if not run.cuda:
        raise Skip("nccl needs CUDA (tests/test_train.py runs DDP on two CPU processes with gloo)")
    n = torch.cuda.device_count()
    amp = "bf16" if torch.cuda.is_bf16_supported() else "off"
    figure, data = train(run, "wav2lip_train.py", amp, (*launcher, str(n)), n)
    if n == 1:
        figure += " (world size 1: no process group, nccl unused)"
    return f"--amp {amp}, {figure}", data


# --- timings ---------------------------------------------------------------------------------------------


def generator_fps(run: Run, fp16: bool, batch: int) -> float:
    """Frames/s of `Generator.predict` (uint8 crops in, uint8 faces out) at `batch`, after one warm-up call."""
    sync = run.sync(run.device, fp16)
    size = sync.hp.img_size
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    mels = rng.standard_normal((batch, 1, 80, 16)).astype(np.float32)
    sync.generator.predict(faces, mels)  # cuDNN picks its kernels
    rounds = min(MAX_ROUNDS, max(1, run.sizes.timed_frames // batch))
    start = time.perf_counter()
    for _ in range(rounds):
        sync.generator.predict(faces, mels)  # returns on the host, so the device has finished
    return rounds * batch / (time.perf_counter() - start)


def speed_generator(fp16: bool) -> StepFn:
    def step(run: Run) -> tuple[str, dict]:
        if fp16 and not run.cuda:
            raise Skip("--fp16 needs CUDA")
        fps = {batch: generator_fps(run, fp16, batch) for batch in run.sizes.generator_batches}
        return ", ".join(f"batch {b}: {v:.0f}" for b, v in fps.items()) + " frames/s", {"frames_per_s": fps}

    return step


def speed_s3fd(run: Run) -> tuple[str, dict]:
    """S3FD on the big clip's decoded frames, in the pipeline's detection batches (halved on out-of-memory)."""
    face, _ = run.big_clip
    frames = list(itertools.islice(video.iter_frames(face), run.sizes.detect_frames))
    detector = face_detection.FaceAlignment(face_detection.LandmarksType._2D, flip_input=False, device=run.device,
                                            path_to_detector=run.s3fd_weights)  # fmt: skip
    batch = Options().face_det_batch_size
    limit = BatchLimit(batch, "S3FD", quiet=True)

    def detect() -> list:
        return in_chunks(lambda chunk: detector.get_detections_for_batch(np.stack(chunk)), frames, limit, batch)

    detect()  # warm-up
    start = time.perf_counter()
    detect()
    fps = len(frames) / (time.perf_counter() - start)
    height, width = frames[0].shape[:2]
    data = {"frames_per_s": fps, "frames": len(frames), "batch": limit.size, "size": [width, height]}
    return f"{fps:.1f} frames/s at {width}x{height}, batches of {limit.size}", data


def speed_inference(detect: bool) -> StepFn:
    def step(run: Run) -> tuple[str, dict]:
        """The whole `python inference.py` command on the big clip, from process start to exit."""
        face, speech = run.big_clip
        out = run.tmp / f"e2e-{'detect' if detect else 'box'}.mp4"
        cmd = [sys.executable, "inference.py", "--checkpoint_path", str(run.wav2lip_checkpoint), "--face", str(face),
               "--audio", str(speech), "--outfile", str(out), "--detector_path", str(run.s3fd_weights),
               "--device", run.device.type, "--quiet"]  # fmt: skip
        if not detect:
            cmd += ["--box", *map(str, run.center_box(face))]
        start = time.perf_counter()
        run_command(cmd, run.remaining())
        seconds = time.perf_counter() - start
        info = video.probe(out)
        data = {"frames_per_s": info.n_frames / seconds, "frames": info.n_frames, "seconds": seconds,
                "size": [info.width, info.height]}  # fmt: skip
        return f"{info.n_frames / seconds:.1f} frames/s ({info.n_frames} frames {info.width}x{info.height} in " \
               f"{seconds:.1f} s, start to exit)", data  # fmt: skip

    return step


STEP_LINE = re.compile(r"^\s*(\S+)\s+batch\s+(\d+):\s+([\d.]+) s/step", re.MULTILINE)  # train_step's report


def speed_train_step(amp: str) -> StepFn:
    def step(run: Run) -> tuple[str, dict]:
        """bench/train_step.py: forward + backward + optimizer step on random inputs of the real shapes."""
        if amp != "off" and not run.cuda:
            raise Skip(f"--amp {amp} needs CUDA")
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            raise Skip("no bfloat16 on this GPU")
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            train_step.main(["--device", str(run.device), "--amp", amp, *run.sizes.train_step_args])
        found = STEP_LINE.findall(printed.getvalue())
        if not found:
            raise Failed(f"no 'batch N: T s/step' line in bench/train_step.py's output: {printed.getvalue()!r}")
        data = {name: {"batch": int(batch), "s_per_step": float(t)} for name, batch, t in found}
        return ", ".join(f"{n} {float(t) * 1e3:.1f} ms/step (batch {b})" for n, b, t in found), data

    return step


STEPS = [
    Step("inference fp32 --box", lambda run: compare_inference(run, fp16=False, detect=False), 10),
    Step("inference fp32 detect", lambda run: compare_inference(run, fp16=False, detect=True), 15),
    Step("inference fp16 --box", lambda run: compare_inference(run, fp16=True, detect=False), 5),
    Step("inference fp16 detect", lambda run: compare_inference(run, fp16=True, detect=True), 8),
    Step("s3fd boxes", step_s3fd_boxes, 8),
    Step("oom halving", step_oom, 8),
    Step("lse", step_lse, 8),
    Step("train expert bf16", step_train("color_syncnet_train.py", "bf16"), 15),
    Step("train expert fp16", step_train("color_syncnet_train.py", "fp16"), 15),
    Step("train generator+gan bf16", step_train("wav2lip_train.py", "bf16"), 20),
    Step("train generator+gan fp16", step_train("wav2lip_train.py", "fp16"), 20),
    Step("ddp nccl (torchrun)", step_ddp, 25),
    Step("speed generator fp32", speed_generator(False), 6),
    Step("speed generator fp16", speed_generator(True), 6),
    Step("speed s3fd 1080p", speed_s3fd, 8),
    Step("speed inference.py detect 1080p", speed_inference(True), 20),
    Step("speed inference.py --box 1080p", speed_inference(False), 15),
    Step("speed train step fp32", speed_train_step("off"), 6),
    Step("speed train step bf16", speed_train_step("bf16"), 6),
    Step("speed train step fp16", speed_train_step("fp16"), 6),
]


# --- the run ---------------------------------------------------------------------------------------------


def run_step(step: Step, run: Run, scale: float) -> Outcome:
    """One step, its failure caught: an exception's first line is its reason, its traceback goes in the JSON."""
    need = step.estimate * scale
    if run.remaining() < need:
        return Outcome(step.name, "SKIP", f"budget: {max(0.0, run.remaining()):.0f} s left, needs ~{need:.0f} s", 0.0)
    start = time.perf_counter()
    status, data = "PASS", {}
    try:
        figure, data = step.fn(run)
    except (Skip, Failed) as e:
        status, figure, data = ("SKIP" if isinstance(e, Skip) else "FAIL"), str(e), e.data
    except Exception as e:  # noqa: BLE001 - any error fails this step only; the others still run
        first = (str(e).strip().splitlines() or [""])[0]
        status, figure, data = "FAIL", f"{type(e).__name__}: {first}", {"traceback": traceback.format_exc()}
    finally:
        if run.cuda:
            torch.cuda.empty_cache()
    return Outcome(step.name, status, figure, time.perf_counter() - start, data)


def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "gpus": torch.cuda.device_count(), "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}", "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}  # fmt: skip
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def jsonable(value: object) -> object:
    """Plain JSON: infinities and NaN as strings, paths and NumPy scalars as their values, keys as text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def table(outcomes: list[Outcome]) -> str:
    width = max(len(o.step) for o in outcomes)
    rows = [f"{'step':{width}}  status  {'time':>7}  figure"]
    rows += [f"{o.step:{width}}  {o.status:6}  {o.seconds:6.1f}s  {o.figure}" for o in outcomes]
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/gpu_check.json", help="the JSON report (written atomically)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one training step: a smoke run")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --allow_cpu)")
    p.add_argument("--allow_cpu", action="store_true", help="run the steps on the CPU against the CPU (for CI)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all the steps together")
    p.add_argument("--only", default="", help="comma-separated parts of step names: run only those steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    if not args.device.startswith("cuda") and not (args.device == "cpu" and args.allow_cpu):
        raise UserError(f"--device {args.device}: use cuda or cuda:N (or cpu with --allow_cpu, to check the steps)")
    device = torch.device(args.device)
    sizes = FULL if device.type == "cuda" and not args.quick else QUICK
    wanted = [s for s in STEPS if not args.only or any(w.strip() in s.name for w in args.only.split(","))]
    if not wanted:
        raise UserError(f"--only {args.only}: no step name contains it; steps: {', '.join(s.name for s in STEPS)}")
    env = environment(device)
    print(f"gpu_check on {env.get('gpu', 'the CPU')}, torch {env['torch']}: {len(wanted)} steps, "
          f"budget {args.budget:.0f} s{', quick' if sizes is QUICK else ''}", flush=True)  # fmt: skip
    started = time.monotonic()
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        run = Run(device, sizes, Path(tmp), started + args.budget)
        for step in wanted:
            outcomes.append(run_step(step, run, 1.0 if sizes is FULL else 0.25))
            print(f"  {step.name}: {outcomes[-1].status} ({outcomes[-1].seconds:.1f} s)", file=sys.stderr, flush=True)
    print(table(outcomes))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("PASS", "FAIL", "SKIP")}
    report = {"environment": env, "quick": sizes is QUICK, "budget_s": args.budget,
              "elapsed_s": time.monotonic() - started, "counts": counts, "steps": [asdict(o) for o in outcomes]}  # fmt: skip
    write_text_atomic(args.out, json.dumps(jsonable(report), indent=1) + "\n")
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped; wrote {args.out}")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))

"""A newcomer's path through the README, run as the README gives it: the tiny training path (data, expert,
generator, generator with GAN, lip-sync), the stand-in weights' lip-sync; and what the first runs say
(detection's progress and time, the app's share hint, the browser tests' summary line).

The README's commands are read from the README itself, so a command that changes there is the command
tested here. Only where their files go changes (`runs/`, `results/`, `checkpoints/` → a temporary folder),
so a test never writes into the checkout; nothing else is added, `--eval_steps` included.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from lipsync import face_boxes
from lipsync.options import ModelOptions, Options
from lipsync.pipeline import LipSync
from tests.media import FakeDetector, write_video, write_wav
from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def readme_commands(heading: str) -> list[str]:
    """The commands of the first ```bash block under `heading` (a whole heading line), continuation lines
    joined and comments dropped."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("#")[0].strip() for line in joined.splitlines() if line.split("#")[0].strip()]


def run_readme_command(command: str, moves: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run one README command from the repository root, with the README's `python` as this interpreter and
    each output folder of `moves` (a README path prefix → a temporary one) moved."""
    words = shlex.split(command)
    assert words[0] == "python", command
    words = [sys.executable, *(move(w, moves) for w in words[1:])]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    done = subprocess.run(words, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr + done.stdout, f"{command}\n{done.stderr[-3000:]}"
    return done


def move(word: str, moves: dict[str, str]) -> str:
    for prefix, to in moves.items():
        if word.startswith(prefix):
            return to + word[len(prefix) :]
    return word


def eval_keys(output: str) -> set[str]:
    """The losses a trainer's last "step N: eval k v, ..." line names."""
    line = [x for x in output.splitlines() if re.match(r"step \d+: eval ", x)][-1]
    return set(re.findall(r"(\w+) -?[\d.]+(?:e-?\d+)?(?=,|;|$)", line.split(": eval ", 1)[1]))


def frames_of(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


# --- the README's two paths, as written --------------------------------------------------------------


def test_the_readme_tiny_training_path_runs_as_written(tmp_path):
    """Data, expert, generator, generator with GAN and a lip-sync with the result, each exiting 0 with no
    traceback: the generator evaluates with the default `--eval_steps`, the whole val split, whose 67
    windows in batches of 2 end in a batch of one: the one that crashed the step-1 evaluation."""
    commands = readme_commands("### Train a tiny Wav2Lip on a CPU")
    assert [c.split()[1] for c in commands] == [
        "-m", "color_syncnet_train.py", "wav2lip_train.py", "wav2lip_train.py", "inference.py",
    ]  # fmt: skip
    assert not any("--eval_steps" in c for c in commands)
    assert "--gan" in commands[3] and "--gan" not in commands[2]
    moves = {"runs/": f"{tmp_path}/runs/"}
    outputs = []
    for command in commands:
        done = run_readme_command(command, moves, timeout=1800)
        outputs.append(done.stdout + done.stderr)
        if "--checkpoint_dir" in command:
            folder = Path(move(shlex.split(command)[shlex.split(command).index("--checkpoint_dir") + 1], moves))
            assert sorted(folder.glob("checkpoint_step*.pth")), f"no checkpoint in {folder}"
    assert "l1" in eval_keys(outputs[2]) and "perceptual" not in eval_keys(outputs[2])
    assert {"l1", "perceptual", "disc_real", "disc_fake"} <= eval_keys(outputs[3])
    assert "disc_checkpoint_step000000020.pth" in {p.name for p in (tmp_path / "runs/tiny/wav2lip_gan").iterdir()}
    result = Path(move(shlex.split(commands[4])[-1], moves))
    assert result.is_file() and len(frames_of(result)) == 75  # 3 s of speech at 25 fps


def test_the_readme_stand_in_path_runs_as_written(tmp_path):
    """Stand-in weights, a synthetic clip and a lip-sync with `--box`: the box holds the noise patch."""
    commands = readme_commands("## Try it without weights")
    assert commands[0] == "python -m tools.detweights" and "--box" in commands[2]
    ckpt = tmp_path / "checkpoints"
    moves = {"checkpoints/": f"{ckpt}/", "runs/": f"{tmp_path}/runs/", "results/": f"{tmp_path}/results/"}
    # the README's stand-ins go to checkpoints/ and face_detection/: here into the temporary folder
    commands[0] += f" --out {ckpt} --detector_out {ckpt}/s3fd.pth"
    said = run_readme_command(commands[0], moves, timeout=600).stdout
    assert "STAND-IN" in said and "noise patch" in said and "--box" in said
    assert {p.name for p in ckpt.iterdir()} == {"wav2lip_gan.pth", "s3fd.pth"}
    for command in commands[1:]:
        run_readme_command(command, moves, timeout=900)
    words = shlex.split(commands[2])
    top, bottom, left, right = (int(v) for v in words[words.index("--box") + 1 :][:4])
    source = Path(move(words[words.index("--face") + 1], moves))
    result = Path(move(words[words.index("--outfile") + 1], moves))
    before, after = frames_of(source), frames_of(result)
    assert len(before) == 100 and abs(len(after) - 100) <= 1  # the 4 s clip with its own speech (AAC: ±1 frame)
    inside = np.abs(after[10][top:bottom, left:right].astype(int) - before[10][top:bottom, left:right])
    outside = np.abs(after[10][:top].astype(int) - before[10][:top])
    assert inside.mean() > 10 * max(outside.mean(), 1), "the box does not hold the generated patch"


# --- what a first run says ---------------------------------------------------------------------------


class SlowDetector(FakeDetector):
    """The test media's detector, taking `seconds` a frame as S3FD does on a CPU; notes when each batch ends."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.ends = seconds, []

    def get_detections_for_batch(self, frames: np.ndarray) -> list:
        time.sleep(self.seconds * len(frames))
        self.ends.append((time.perf_counter(), self.frames_seen + len(frames)))
        return super().get_detections_for_batch(frames)


class StopError(Exception):
    """Raised from the progress report to end a run once detection is done."""


def detection_reports(tmp_path: Path, wav2lip_checkpoint: Path, quiet: bool, **options) -> tuple[list, SlowDetector]:
    """The "detect faces" progress reports (time, done, total) of a run on 40 frames, stopped when
    lip-syncing begins; and its detector."""
    face = write_video(tmp_path / "face.mp4", 40)
    speech = write_wav(tmp_path / "speech.wav", 1.6)
    detector = SlowDetector(0.02)
    sync = LipSync(ModelOptions(checkpoint_path=str(wav2lip_checkpoint), device="cpu"), detector=detector, quiet=quiet)
    reports = []

    def report(stage: str, done: int, total: int | None) -> None:
        if stage != "detect faces":
            raise StopError
        reports.append((time.perf_counter(), done, total))

    with pytest.raises(StopError):
        sync(face, speech, tmp_path / "out.mp4", on_progress=report, quiet=quiet, **options)
    return reports, detector


def test_detection_counts_frames_when_they_are_detected(tmp_path, wav2lip_checkpoint):
    """The bar moves when a batch is detected, by all its frames, never ahead of the detector: so its rate,
    and the time left, are detection's from the first batch on (not the decoder's, which ran ahead)."""
    reports, detector = detection_reports(tmp_path, wav2lip_checkpoint, True, face_det_batch_size=16)
    assert [done for _, done, _ in reports] == [16, 32, 40] and {total for *_, total in reports} == {40}
    for (when, done, _), (detected_at, detected) in zip(reports, detector.ends, strict=True):
        assert when >= detected_at and done == detected
    every, _ = detection_reports(tmp_path, wav2lip_checkpoint, True, face_det_batch_size=4, det_every=5)
    assert [done for _, done, _ in every] == [
        16,
        36,
        40,
    ]  # keyframes 0, 5, 10, 15 | 20 … 35 | 39: all frames up to them


def test_a_long_detection_says_how_long_and_what_shortens_it(tmp_path, wav2lip_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(face_boxes, "LONG_DETECTION_S", 0.0)
    detection_reports(tmp_path, wav2lip_checkpoint, False, face_det_batch_size=8)
    err = capsys.readouterr().err
    assert err.count("note: face detection will take about") == 1, err
    note = next(line for line in err.splitlines() if "note: face detection" in line)
    assert (
        re.search(r"\(40 frames at \d+\.\d\d s each\)", note)
        and "--box" in note
        and "--det_every 5" in note
        and "--cache_dir" in note
    )
    assert "--det_max_side" not in note  # 160×128 frames: nothing to scale down


def test_the_duration_note_names_only_what_would_help():
    frame = (1080, 1920, 3)
    assert face_boxes.duration_note(200, 16, 0.1, Options(), frame, False) is None  # 18 s: no note
    note = face_boxes.duration_note(200, 16, 1.9, Options(), frame, False)
    assert note.startswith("note: face detection will take about 6 min 20 s (200 frames at 1.90 s each)")
    assert "--det_max_side 320 (~36.0× less work a frame)" in note and "--det_every 5 (~5× fewer frames)" in note
    fast = face_boxes.duration_note(2000, 16, 1.9, Options(det_max_side=320, det_every=5), frame, True)
    assert "--box" in fast and "--det_max_side" not in fast and "--det_every" not in fast and "--cache_dir" not in fast
    assert face_boxes.minutes(59.4) == "59 s" and face_boxes.minutes(3725) == "1 h 2 min"


def test_the_app_names_its_own_share_flag(tmp_path):
    """Gradio's launch line says "set `share=True` in `launch()`"; the app's says --share."""
    pytest.importorskip("gradio")
    port = free_port()
    env = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(app.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and app.poll() is None and "Running on local URL" not in "".join(lines):
            time.sleep(0.2)
        time.sleep(2)  # whatever follows the URL line
        said = "".join(lines)
        assert f"Running on local URL: http://127.0.0.1:{port}" in said, said
        assert "To create a public link, run app.py with --share." in said and "share=True" not in said, said
    finally:
        app.send_signal(signal.SIGTERM)
        try:
            app.wait(timeout=60)
        except subprocess.TimeoutExpired:
            app.kill()


def test_the_summary_says_when_the_browser_tests_did_not_run(tmp_path):
    """Without Chromium the browser tests skip; the summary's last lines say so, and how to run them."""
    (tmp_path / "test_page.py").write_text(
        "import pytest\n\n"
        "def test_page():\n    pytest.skip('no chromium/chromedriver (CI installs them)')\n\n"
        "def test_other():\n    pytest.skip('something else')\n"
    )
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    pass\n")
    run = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    skipped = subprocess.run([*run, str(tmp_path / "test_page.py")], cwd=REPO, capture_output=True, text=True)
    assert (
        "1 browser tests did not run" in skipped.stdout and "apt-get install chromium chromium-driver" in skipped.stdout
    )
    plain = subprocess.run([*run, str(tmp_path / "test_plain.py")], cwd=REPO, capture_output=True, text=True)
    assert plain.returncode == 0 and "browser tests" not in plain.stdout


def test_an_export_lands_under_checkpoints_and_git_ignores_it():
    import export_onnx

    args = export_onnx.build_parser().parse_args(["--model", "s3fd", "--checkpoint_path", "x/s3fd.pth"])
    assert args.out is None  # optional
    assert export_onnx.default_out(args.checkpoint_path) == REPO / "checkpoints" / "s3fd.onnx"
    paths = ["checkpoints/s3fd.onnx", "wav2lip_gan.onnx", "checkpoints/wav2lip_gan.pth", "runs/tiny/x.pth"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True).stdout
    assert ignored.split() == paths

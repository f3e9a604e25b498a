"""inference.py: the command line, and every bad input ending in one line, exit code 2 and no output file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import inference
import lipsync
from common.errors import UserError
from lipsync.options import ModelOptions
from tests.cli import cli
from tests.media import FakeDetector, read_output, write_empty_video, write_video, write_wav
from tools.detweights import det_state_dict

REPO = Path(__file__).resolve().parent.parent
BOX = ["--box", "20", "100", "30", "120"]  # inside the 160x128 test frames


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli media")
    speech = write_wav(d / "speech.wav", 0.4)
    wrong = d / "s3fd_as_wav2lip.pth"
    torch.save({"state_dict": det_state_dict("s3fd")}, wrong)
    text = d / "notes.mp4"
    text.write_text("just text\n" * 20)
    empty_wav = d / "empty.wav"
    write_wav(empty_wav, 0.0)
    return {
        "dir": d,
        "video": write_video(d / "face.mp4", 10),
        "speech": speech,
        "wrong": wrong,
        "text": text,
        "empty_video": write_empty_video(d / "empty.avi"),
        "empty_wav": empty_wav,
    }


def args(ckpt, face, speech, outfile, *extra) -> list:
    return ["--checkpoint_path", ckpt, "--face", face, "--audio", speech, "--outfile", outfile, "--quiet", *extra]


BAD_INPUTS = {
    # case: (face, audio, wav2lip_checkpoint, extra flags, words the message must hold)
    "missing face": ("missing.mp4", "speech", None, BOX, "not found"),
    "face is a folder": ("dir", "speech", None, BOX, "not found"),
    "face not media": ("text", "speech", None, BOX, "neither a video nor an image"),
    "zero-frame video": ("empty_video", "speech", None, BOX, "zero frames"),
    "missing audio": ("video", "missing.wav", None, BOX, "not found"),
    "audio not media": ("video", "text", None, BOX, "cannot be decoded as audio"),
    "audio without audio stream": ("video", "video", None, BOX, "no audio stream"),
    "zero-length audio": ("video", "empty_wav", None, BOX, "empty"),
    "wrong-model wav2lip_checkpoint": ("video", "speech", "wrong", BOX, "s3fd"),
    "missing wav2lip_checkpoint": ("video", "speech", "missing.pth", BOX, "not found"),
    "missing s3fd.pth": ("video", "speech", None, ["--detector_path", "nowhere/s3fd.pth"], "s3fd"),
    "box out of frame": ("video", "speech", None, ["--box", "0", "500", "0", "100"], "--box"),
    "crop out of frame": ("video", "speech", None, [*BOX, "--crop", "0", "-1", "170", "-1"], "--crop"),
    "box of 3 numbers": ("video", "speech", None, ["--box", "1", "2", "3"], "4 integers"),
    "fp16 on cpu": ("video", "speech", None, [*BOX, "--device", "cpu", "--fp16"], "--fp16"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error(case, media, wav2lip_checkpoint, capsys, tmp_path):
    face, speech, ckpt, extra, words = BAD_INPUTS[case]
    face, speech = (media.get(x, media["dir"] / x) for x in (face, speech))
    ckpt = media.get(ckpt, media["dir"] / ckpt) if ckpt else wav2lip_checkpoint
    out = tmp_path / "out" / "result.mp4"
    code, err = cli(args(ckpt, face, speech, out, *extra), capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])


def test_unwritable_output_folder(media, wav2lip_checkpoint, capsys, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    code, err = cli(args(wav2lip_checkpoint, media["video"], media["speech"], blocker / "out.mp4", *BOX), capsys)
    assert code == 2 and err.startswith("error: ") and "cannot write" in err and len(err.strip().splitlines()) == 1


def test_pads_making_an_empty_box(media, wav2lip_checkpoint, tmp_path):
    sync = lipsync.LipSync(
        ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu"), detector=FakeDetector(), quiet=True
    )
    out = tmp_path / "out.mp4"
    with pytest.raises(UserError, match="--pads -80 0 0 0 leave an empty face box"):
        sync(media["video"], media["speech"], out, pads=[-80, 0, 0, 0], quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_run_leaves_no_output(media, wav2lip_checkpoint, tmp_path):
    sync = lipsync.LipSync(ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu"), quiet=True)
    out = tmp_path / "out.mp4"

    def explode(i, frame):
        if i == 3:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        sync(media["video"], media["speech"], out, box=[20, 100, 30, 120], on_frame=explode, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_static_flag_forms():
    parser = inference.build_parser()
    base = ["--checkpoint_path", "c", "--face", "f", "--audio", "a"]
    assert parser.parse_args(base).static is False
    assert parser.parse_args([*base, "--static"]).static is True
    assert parser.parse_args([*base, "--static", "True"]).static is True
    assert parser.parse_args([*base, "--static", "False"]).static is False


def test_command_line_from_another_folder(media, wav2lip_checkpoint, tmp_path):
    """A real process, started elsewhere: output where asked, summary printed, no temp/ left around."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = tmp_path / "my results" / "clip.v2.mp4"
    speech = write_wav(tmp_path / "long speech.wav", 0.8)
    cmd = [sys.executable, REPO / "inference.py", "--checkpoint_path", wav2lip_checkpoint, "--face", media["video"],
           "--audio", speech, "--outfile", out, *BOX, "--static", "True"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "20 frames" in done.stdout and str(out) in done.stdout and "Using cpu" in done.stderr
    frames, seconds_v, seconds_a, _ = read_output(out)
    assert len(frames) == 20 and seconds_v == pytest.approx(0.8) and seconds_a == pytest.approx(0.8, abs=0.03)
    assert list(cwd.iterdir()) == [] and sorted(p.name for p in out.parent.iterdir()) == ["clip.v2.mp4"]
    missing = subprocess.run(
        [sys.executable, str(REPO / "inference.py"), "--checkpoint_path", str(wav2lip_checkpoint), "--face", "nope.mp4",
         "--audio", str(speech)], cwd=cwd, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: nope.mp4")


def test_audio_track_of_video_is_muxed(media, wav2lip_checkpoint, tmp_path):
    with av.open(str(media["video"])) as c:
        assert not c.streams.audio  # the face video is silent; the output carries the speech
    out = tmp_path / "o.mp4"
    model = ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu")
    summary = lipsync.lipsync(media["video"], media["speech"], model, out, box=[20, 100, 30, 120], quiet=True)
    assert summary.frames == 10 and read_output(out)[0][0].dtype == np.uint8


def test_two_runs_writing_one_outfile_leave_one_whole_video(media, wav2lip_checkpoint, tmp_path):
    """Two `inference.py` processes at once, one `--outfile`: both succeed, the file is one whole video."""
    out = tmp_path / "shared" / "out.mp4"
    cmd = [sys.executable, str(REPO / "inference.py"), "--checkpoint_path", str(wav2lip_checkpoint), "--face",
           str(media["video"]), "--audio", str(media["speech"]), "--outfile", str(out), *BOX, "--quiet"]  # fmt: skip
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    frames, seconds_v, seconds_a, _ = read_output(out)
    assert len(frames) == 10 and seconds_v == pytest.approx(0.4) and seconds_a == pytest.approx(0.4, abs=0.03)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.mp4"]  # no temporary file left behind


def test_runs_sharing_a_cache_dir_never_read_a_torn_entry(media, wav2lip_checkpoint, tmp_path):
    """Two pipelines fill one `--cache_dir` at once while a reader keeps parsing every entry it sees."""
    import json
    import threading

    cache = tmp_path / "cache"
    model = ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu", cache_dir=str(cache))
    syncs = [lipsync.LipSync(model, detector=FakeDetector(), quiet=True) for _ in range(2)]
    done, torn, seen = threading.Event(), [], set()

    def read_entries() -> None:
        while not done.is_set():
            for entry in (
                (cache / "boxes").glob("[!.]*.json") if (cache / "boxes").is_dir() else []
            ):  # not the writers' temporary files
                seen.add(entry.name)
                try:
                    json.loads(entry.read_text())
                except (ValueError, FileNotFoundError) as e:
                    torn.append(f"{entry.name}: {e}")

    reader = threading.Thread(target=read_entries)
    reader.start()
    try:
        runs = [threading.Thread(target=sync, args=(media["video"], media["speech"], tmp_path / f"{i}.mp4"),
                                 kwargs={"quiet": True}) for i, sync in enumerate(syncs)]  # fmt: skip
        for run in runs:
            run.start()
        for run in runs:
            run.join()
    finally:
        done.set()
        reader.join()
    assert not torn and len(seen) == 1  # one entry (both runs share its key), always whole when read
    assert [p.name for p in (cache / "boxes").iterdir()] == list(seen)  # and no temporary file left
    assert all((tmp_path / f"{i}.mp4").is_file() for i in range(2))

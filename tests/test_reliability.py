"""Issue 14: the pipeline's bad days are boring non-events (the README's "Fault catalogue").

Hostile weight files, bad data inside a prepared dataset, divergence, AMP skips, resuming the wrong
checkpoint, two trainers on one folder, bad videos and restarts in the evaluation scripts, unreadable
folders and failures in preprocessing. The SIGKILL tests are in test_reliability_kill.py.
"""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import color_syncnet_train
import preprocess
import wav2lip_train
from common.errors import UserError
from tests.media import write_video, write_wav
from tests.test_preprocess import FakeDetector
from tools.detweights import det_state_dict
from tools.make_synthetic_lrs2 import make_dataset
from training import datasets, loop, run_folder

REPO = Path(__file__).resolve().parent.parent
FAST = (
    "syncnet_batch_size=2,batch_size=2,syncnet_checkpoint_interval=1,checkpoint_interval=1,"
    "syncnet_eval_interval=1000,eval_interval=1000"
)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rel_synth")
    make_dataset(root, speakers=2, videos_per_speaker=1, seconds=1.2, seed=0, filelists_dir=root / "filelists")
    return root


@pytest.fixture
def copy(synth, tmp_path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(synth, root)
    return root


def trainer_args(root: Path, ckpt: Path, *extra: str, hp: str = "") -> list[str]:
    """A tiny run's flags; `hp`: more hparams (only the last --hparams counts, so they join FAST's)."""
    return ["--data_root", str(root), "--filelists_dir", str(root / "filelists"), "--checkpoint_dir", str(ckpt),
            "--hparams", ",".join(filter(None, [FAST, hp])), "--no_tqdm", "--num_workers", "0", "--eval_steps", "1",
            *extra]  # fmt: skip


# --- 5. hostile weight files ------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """A `.pth` holding real Wav2Lip weights and a payload; and the file the payload would create."""
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "wav2lip_gan.pth"
    torch.save({"state_dict": det_state_dict("SyncNet_color"), "x": Payload(marker)}, path)
    return path, marker


def _media(tmp_path: Path) -> tuple[Path, Path]:
    return write_video(tmp_path / "face.mp4", 10), write_wav(tmp_path / "speech.wav", 0.5)


def _script_args(script: str, evil: Path, tmp: Path) -> tuple[object, list[str]]:
    """The script's main and arguments that hand it the hostile file where it reads weights."""
    import export_onnx
    import inference
    import realtime
    from evaluation import gen_videos_from_filelist
    from evaluation.scores_LSE import calculate_scores_LRS, calculate_scores_real_videos

    videos = tmp / "videos"
    videos.mkdir(exist_ok=True)
    (videos / "a.mp4").write_bytes(b"")
    face, speech = _media(tmp)
    expert = tmp / "expert.pth"
    torch.save({"state_dict": det_state_dict("SyncNet_color")}, expert)
    return {
        "inference": (inference.main, ["--checkpoint_path", evil, "--face", face, "--audio", speech,
                                       "--outfile", tmp / "o.mp4"]),
        "export_onnx": (export_onnx.main, ["--model", "wav2lip", "--checkpoint_path", evil, "--out", tmp / "o.onnx"]),
        "expert": (color_syncnet_train.main, ["--checkpoint_path", evil]),
        "generator": (wav2lip_train.main, ["--syncnet_checkpoint_path", expert, "--checkpoint_path", evil]),
        "generator-expert": (wav2lip_train.main, ["--syncnet_checkpoint_path", evil]),
        "lse": (calculate_scores_LRS.main, ["--data_root", videos, "--initial_model", evil]),
        "lse-real": (calculate_scores_real_videos.main, ["--data_root", videos, "--facedet_model", evil]),
        "preprocess": (preprocess.main, ["--data_root", videos.parent, "--pattern", "videos/*.mp4",
                                         "--preprocessed_root", tmp / "pre", "--detector_path", evil]),
        "realtime": (realtime.main, ["--checkpoint_path", evil, "--face", face, "--audio", speech,
                                     "--outfile", tmp / "r.mp4", "--pace", "fast"]),
        "gen_videos": (gen_videos_from_filelist.main, ["--filelist", filelist(tmp, face, speech), "--data_root", "/",
                                                      "--results_dir", tmp / "res", "--checkpoint_path", evil]),
    }[script]  # fmt: skip


def filelist(tmp: Path, face: Path, speech: Path) -> Path:
    """A one-line test filelist (paths without .mp4, under --data_root /) pairing `speech`'s clip with `face`."""
    clip = tmp / "speech_clip.mp4"
    write_video(clip, 10, audio=speech)
    path = tmp / "test.txt"
    path.write_text(f"{str(clip)[1:-4]} {str(face)[1:-4]}\n")
    return path


@pytest.mark.parametrize(
    "script",
    ["inference", "export_onnx", "expert", "generator", "generator-expert", "lse", "lse-real", "preprocess", "realtime",
     "gen_videos"],
)  # fmt: skip
def test_pickle_bomb_is_refused_and_never_runs(script, evil, synth, tmp_path, monkeypatch):
    path, marker = evil
    main, argv = _script_args(script, path, tmp_path)
    if script in ("expert", "generator", "generator-expert"):
        argv = trainer_args(synth, tmp_path / "ckpt", "--max_steps", "1", *map(str, argv))
    if script == "preprocess":  # process_video reports any error as a failed video: build the detector here
        monkeypatch.setattr(preprocess, "run", lambda *a, **k: preprocess.make_detector("cpu", str(path)))
    with pytest.raises(UserError) as e:
        main([str(a) for a in argv])
    message = str(e.value)
    assert str(path) in message and "refused for safety" in message and "holds more than weights" in message
    assert "truncated" not in message and "\n" not in message
    assert not marker.exists(), "the payload ran"


def test_a_plain_state_dict_still_loads_and_damage_is_still_damage(tmp_path):
    import models
    from common import weights as checkpoints

    sd = det_state_dict("SyncNet_color")
    torch.save({"state_dict": sd, "global_step": 3}, tmp_path / "ok.pth")
    checkpoints.load_model(models.SyncNet_color(), tmp_path / "ok.pth", "SyncNet_color")
    (tmp_path / "bad.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated or damaged"):
        checkpoints.load_model(models.SyncNet_color(), tmp_path / "bad.pth", "SyncNet_color")


@pytest.mark.parametrize("entry", ["../outside/00000", "/etc", "spk00/../../x"])
def test_filelist_paths_cannot_escape_data_root(copy, entry):
    (copy / "filelists" / "train.txt").write_text(f"spk00/00000\n{entry}\n")
    with pytest.raises(UserError, match="points outside --data_root"):
        datasets.SyncDataset(copy, "train", copy / "filelists")


# --- 2. bad data inside a prepared dataset ------------------------------------------------------------------


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


BAD_DATA = {
    "truncated jpeg": lambda f: _truncate(f / "7.jpg", 0.3),
    "corrupt jpeg": lambda f: (f / "7.jpg").write_bytes(b"\xff\xd8 not a jpeg"),
    "truncated audio.wav": lambda f: _truncate(f / "audio.wav", 0.02),
    "missing audio.wav": lambda f: (f / "audio.wav").unlink(),
    "garbage audio.wav": lambda f: (f / "audio.wav").write_bytes(b"RIFF garbage"),
    "truncated mel.npy": lambda f: _truncate(f / "mel.npy", 0.5),
    "too few frames": lambda f: [p.unlink() for p in f.glob("*.jpg") if datasets.frame_id(p.name) >= 10],
}


@pytest.mark.parametrize("kind", list(BAD_DATA))
@pytest.mark.parametrize("dataset", [datasets.SyncDataset, datasets.Wav2LipDataset])
def test_bad_video_is_skipped_and_the_rest_trains(copy, kind, dataset, capsys):
    good, bad = copy / "spk00" / "00000", copy / "spk01" / "00000"
    (copy / "filelists" / "train.txt").write_text("spk00/00000\nspk01/00000\n")
    datasets.load_mel(bad)  # a mel cache to damage
    BAD_DATA[kind](bad)
    ds = dataset(copy, "train", copy / "filelists")
    for i in range(len(ds)):
        ds[i]
    usable = {v.folder for v in ds.videos} - ds.bad
    assert usable == ({good, bad} if kind == "truncated mel.npy" else {good})
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith(f"warning: {bad}:")]
    short = [line for line in err if "have no usable window" in line]
    # an unreadable video is reported once; a bad cache is rebuilt; a video too short for any window (too few
    # frames or speech, as the original leaves out short videos) is counted in one line naming it
    too_short = kind in ("too few frames", "truncated audio.wav")
    assert len(warnings) == (0 if too_short or kind == "truncated mel.npy" else 1)
    assert len(short) == too_short and (not short or "1 of the 2 videos" in short[0] and str(bad) in short[0])


def test_filelist_naming_missing_folders_skips_them(copy, capsys):
    (copy / "filelists" / "train.txt").write_text("spk00/00000\nspk07/00042\n")
    ds = datasets.SyncDataset(copy, "train", copy / "filelists")
    assert [v.folder.name for v in ds.videos] == ["00000"]
    assert "1 of 2 entries have no folder" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["", "\n\n", "spk07/00042\n"])
def test_nothing_usable_is_one_line_before_any_model_is_built(copy, tmp_path, content, monkeypatch):
    (copy / "filelists" / "train.txt").write_text(content)
    monkeypatch.setattr(color_syncnet_train, "SyncNet_color", lambda: pytest.fail("a model was built"))
    with pytest.raises(UserError, match=r"train\.txt: (the filelist is empty|1 of 1 entries)") as e:
        color_syncnet_train.main(trainer_args(copy, tmp_path / "c", "--max_steps", "1"))
    assert "\n" not in str(e.value)


# --- 2. divergence, AMP, resuming the wrong checkpoint, one trainer per folder --------------------------------


def test_divergence_stops_naming_the_step_and_keeps_the_good_checkpoint(synth, tmp_path):
    ckpt = tmp_path / "c"
    argv = trainer_args(synth, ckpt, "--max_steps", "12", hp="syncnet_lr=1e12")  # an absurd learning rate
    with pytest.raises(run_folder.DivergedError, match=r"^step \d+: training diverged \(") as e:
        color_syncnet_train.main(argv)
    message = str(e.value)
    print(message)
    last = run_folder.latest_checkpoint(ckpt)
    assert (f"the last good checkpoint, {last}, is kept" if last else "no checkpoint was written yet") in message
    for path in ckpt.glob("checkpoint_step*.pth"):  # whatever was saved before the divergence is finite
        sd = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in sd.values()), path
    assert not list(ckpt.glob(".*partial*"))


def test_non_finite_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(run_folder.DivergedError, match="step 5: .*weight.*last good checkpoint, g.pth, is kept"):
        run_folder.save(tmp_path, model, torch.optim.SGD(model.parameters(), 0.1), 5, 0,
                           color_syncnet_train.ExpertConfig.__dataclass_fields__["hparams"].default_factory(),
                           last_good="g.pth")  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_skipped_fp16_steps_are_counted_not_divergence():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    p.register_hook(lambda g: g * float("inf"))  # gradients overflow, the loss itself is finite
    loss = (p * 2).sum()
    assert loop.optimizer_step(loss, opt, scaler) is False
    assert torch.equal(p.detach(), torch.ones(3))  # skipped, not applied
    run_folder.check_finite(1, {"loss": loss.item()}, None)  # not divergence
    assert loop.amp_scalars(scaler, 1) == {"amp_scale": 2.0**15, "amp_skipped_steps": 1}
    assert loop.amp_scalars(torch.amp.GradScaler("cpu", enabled=False), 0) == {}


def test_resuming_another_img_size_is_one_line(synth, tmp_path):
    first = color_syncnet_train.train(
        color_syncnet_train.config_from_argv(trainer_args(synth, tmp_path / "a", "--max_steps", "1"))
    )
    argv = trainer_args(synth, tmp_path / "b", "--max_steps", "2", "--checkpoint_path", str(first.checkpoint),
                        hp="img_size=192")  # fmt: skip
    with pytest.raises(UserError, match=r"trained with img_size=96, this run uses img_size=192"):
        color_syncnet_train.main(argv)


def test_resuming_another_models_checkpoint_is_one_line(synth, tmp_path):
    expert = tmp_path / "expert.pth"
    torch.save({"state_dict": det_state_dict("SyncNet_color")}, expert)
    argv = trainer_args(synth, tmp_path / "c", "--max_steps", "1", "--syncnet_checkpoint_path", str(expert),
                        "--checkpoint_path", str(expert))  # fmt: skip
    with pytest.raises(UserError, match="this is a SyncNet_color checkpoint; --checkpoint_path expects Wav2Lip"):
        wav2lip_train.main(argv)


def test_two_trainers_on_one_folder_refuse(synth, tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    busy = pytest.raises(UserError, match=r"another training run \(pid \d+\) is writing checkpoints there")
    with run_folder.exclusive(folder), busy:  # another trainer holds the folder
        color_syncnet_train.main(trainer_args(synth, folder, "--max_steps", "1"))
    assert color_syncnet_train.main(trainer_args(synth, folder, "--max_steps", "1")) is None  # free again


def test_stale_partial_checkpoints_are_removed_by_the_next_run(synth, tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / ".checkpoint_step000000009.partial-0badf00d.pth").write_bytes(b"half")
    color_syncnet_train.main(trainer_args(synth, folder, "--max_steps", "1"))
    assert not list(folder.glob(".*partial*"))
    assert run_folder.latest_checkpoint(folder).name == "checkpoint_step000000001.pth"


# --- 1. preprocessing: failures are reported, the run goes on, the exit status says so ----------------------


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rel_raw")
    make_dataset(root, layout="raw", speakers=1, videos_per_speaker=1, seconds=1.0, seed=3)
    return root


def test_preprocess_bad_inputs_are_reported_and_skipped(raw, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    good = raw / "spk00" / "00000.mp4"
    for name in ("ok", "noface"):
        (src / "spkA").mkdir(parents=True, exist_ok=True)
        shutil.copy(good, src / "spkA" / f"{name}.mp4")
    (src / "spkA" / "empty.mp4").write_bytes(b"")
    (src / "spkA" / "text.mp4").write_text("this is not a video\n")
    (src / "spkA" / "cut.mp4").write_bytes(good.read_bytes()[:3000])
    write_video(src / "spkA" / "silent.mp4", 10)  # no audio track
    (src / "spkLoop").symlink_to("spkLoop")  # a folder that cannot be read, even by root

    class Detector(FakeDetector):
        def get_detections_for_batch(self, frames):
            boxes = super().get_detections_for_batch(frames)
            return [None] * len(boxes) if self.video == "noface" else boxes

    detector = Detector()
    real = preprocess.process_video

    def process(vfile, *a, **k):
        detector.video = vfile.stem
        return real(vfile, *a, **k)

    monkeypatch.setattr(preprocess, "process_video", process)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        preprocess_cli(["--data_root", str(src), "--preprocessed_root", str(out), "--no_tqdm"], detector)
    assert e.value.code == preprocess.EXIT_FAILED
    report = json.loads((out / "preprocess_report.json").read_text())
    failed = {f["video"]: f["reason"] for f in report["failures"]}
    assert set(failed) == {"spkA/empty", "spkA/text", "spkA/cut", "spkA/silent", "spkA/noface", "spkLoop"}
    assert report["done"] == 1 and "no face" in failed["spkA/noface"] and "cannot be read" in failed["spkLoop"]
    err = capsys.readouterr().err
    for video in failed:
        assert sum(line.startswith(f"failed: {video}:") for line in err.splitlines()) == 1
    assert sorted(p.name for p in (out / "spkA").iterdir()) == ["ok"]  # nothing half-written


def preprocess_cli(argv: list[str], detector: FakeDetector) -> None:
    """preprocess.cli with the fake detector: what `python preprocess.py ...` does."""
    report = preprocess.main(argv, detector_factory=lambda device: detector)
    if report["failed"]:
        raise SystemExit(preprocess.EXIT_FAILED)


def test_preprocess_cli_exit_status(raw, tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess, "main", lambda: {"failed": 0})
    preprocess.cli()
    monkeypatch.setattr(preprocess, "main", lambda: {"failed": 2})
    with pytest.raises(SystemExit) as e:
        preprocess.cli()
    assert e.value.code == 1


# --- 3. evaluation: error rows, a whole result file after every video, restarts --------------------------------


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_lse_folder_gets_a_row_per_video_and_restarts(tmp_path, suffix, monkeypatch):
    from evaluation import lse
    from evaluation.scores_LSE import calculate_scores_LRS

    folder = tmp_path / "results"
    folder.mkdir()
    for name in ("a", "b", "c", "d"):
        (folder / f"{name}.mp4").write_bytes(b"x")
    (folder / "notes.txt").write_text("a foreign file")
    (folder / "c.mp4").write_bytes(b"")  # corrupt
    out = tmp_path / f"scores{suffix}"
    scored = []

    def fake_video(model, path, *args):
        name = Path(path).stem
        if name == "c":
            raise ValueError("invalid data found when processing input")
        if name == "d" and len(scored) == 2:
            raise KeyboardInterrupt  # the run is interrupted here
        scored.append(name)
        assert lse.read_results(out) == {} or set(lse.read_results(out)) >= {"a.mp4"}  # whole after every video
        return lse.LSEResult(1, 7.0 + len(scored), 3.0, ())

    monkeypatch.setattr(lse, "evaluate_video", fake_video)
    videos = lse.list_videos(folder)
    with pytest.raises(KeyboardInterrupt):
        calculate_scores_LRS.score_folder(None, videos, 15, 20, False, str(out))
    rows = lse.read_results(out)
    assert set(rows) == {"a.mp4", "b.mp4", "c.mp4"} and "invalid data" in rows["c.mp4"]["error"]
    scored.clear()
    rows = calculate_scores_LRS.score_folder(None, videos, 15, 20, False, str(out))  # the restart
    assert scored == ["d"]  # a and b were kept, c failed again (an error row is retried)
    assert set(rows) == {"a.mp4", "b.mp4", "c.mp4", "d.mp4"}
    assert {k: r["lse_d"] for k, r in lse.read_results(out).items()} == {k: r["lse_d"] for k, r in rows.items()}
    assert rows["a.mp4"]["lse_d"] == 8.0 and lse.average(rows)[0] == pytest.approx((8.0 + 9.0 + 8.0) / 3)


def test_lse_refuses_to_overwrite_a_foreign_result_file(tmp_path):
    from evaluation import lse

    (tmp_path / "scores.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a result file of this script"):
        lse.score_all(["x.mp4"], lambda p: {}, tmp_path / "scores.json")


# --- 4. concurrency ------------------------------------------------------------------------------------------


def test_two_writers_of_one_file_leave_one_whole_file(tmp_path):
    """Two runs writing the same --outfile (video.VideoWriter, the cache, checkpoints: files.atomic_path)."""
    from common.atomic_files import atomic_path

    out = tmp_path / "out.bin"
    a, b = np.full(1 << 20, 1, np.uint8), np.full(1 << 19, 2, np.uint8)
    with atomic_path(out) as ta, atomic_path(out) as tb:
        ta.write_bytes(a[: len(a) // 2].tobytes())
        tb.write_bytes(b.tobytes())
        with open(ta, "ab") as f:
            f.write(a[len(a) // 2 :].tobytes())
    assert out.read_bytes() == a.tobytes()  # the last to finish wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]

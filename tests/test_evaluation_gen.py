"""gen_videos_from_filelist: filelist parsing, torchrun sharding, resume, skipped pairs (with a fake generator)."""

from pathlib import Path

import pytest

from common.errors import UserError
from evaluation import gen_videos_from_filelist as gen


def test_read_pairs_and_errors(tmp_path):
    fl = tmp_path / "lrs2.txt"
    fl.write_text("a/1 b/2\n\nc/3 d/4\n")
    assert gen.read_pairs(fl, "/data") == [("/data/a/1.mp4", "/data/b/2.mp4"), ("/data/c/3.mp4", "/data/d/4.mp4")]
    fl.write_text("only_one\n")
    with pytest.raises(UserError, match="lrs2.txt:1: expected"):
        gen.read_pairs(fl, "/data")
    with pytest.raises(UserError, match="missing.txt: filelist not found"):
        gen.read_pairs(tmp_path / "missing.txt", "/data")


def test_torchrun_ranks_generate_every_line_once(tmp_path, monkeypatch):
    """Under torchrun each rank takes its share of the lines (from RANK / WORLD_SIZE), none twice."""
    (tmp_path / "list.txt").write_text("".join(f"spk/a{i} spk/v{i}\n" for i in range(7)))
    made: dict[int, list[str]] = {}

    def fake_generator(model, *args, **kwargs):
        rank = gen.torchrun_rank().rank

        def generate(face, audio, out):
            made.setdefault(rank, []).append(Path(out).name)
            Path(out).write_text("video")

        return generate

    monkeypatch.setattr(gen, "lipsync_generator", fake_generator)
    args = ["--filelist", str(tmp_path / "list.txt"), "--data_root", "/d", "--results_dir", str(tmp_path / "out")]
    args += ["--checkpoint_path", "w2l.pth", "--device", "cpu"]
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        gen.main(args)
    assert made[0] == ["0.mp4", "3.mp4", "6.mp4"] and made[1] == ["1.mp4", "4.mp4"] and made[2] == ["2.mp4", "5.mp4"]


def test_generate_all_resumes_and_skips_failures(tmp_path):
    pairs = [(f"a{i}.mp4", f"v{i}.mp4") for i in range(4)]
    calls = []

    def fake(face, audio, out):
        calls.append((face, Path(out).name))
        if face == "v2.mp4":
            raise UserError("v2.mp4: no face detected")
        Path(out).write_text("video")  # as VideoWriter: only a whole file ever appears at `out`

    out = tmp_path / "results"
    out.mkdir()
    (out / "0.mp4").write_text("already done")
    report = gen.generate_all(pairs, out, fake, [0, 1, 2, 3])
    assert report == {"done": [1, 3], "skipped": [0], "failed": [2]}
    assert calls == [("v1.mp4", "1.mp4"), ("v2.mp4", "2.mp4"), ("v3.mp4", "3.mp4")]
    assert sorted(p.name for p in out.iterdir()) == ["0.mp4", "1.mp4", "3.mp4"]


def test_end_to_end_through_the_inference_api(tmp_path, wav2lip_checkpoint, s3fd_weights):
    """The real pipeline (deterministic Wav2Lip and S3FD weights): one model load, resume on a second run."""
    from common import video
    from tests.media import write_video, write_wav

    root = tmp_path / "lrs2"
    (root / "spk").mkdir(parents=True)
    write_video(root / "spk" / "v1.mp4", 10, audio=write_wav(tmp_path / "t.wav", 0.4))
    write_video(root / "spk" / "a1.mp4", 8, audio=write_wav(tmp_path / "s.wav", 0.32))
    (tmp_path / "list.txt").write_text("spk/a1 spk/v1\n")
    args = ["--filelist", str(tmp_path / "list.txt"), "--data_root", str(root), "--results_dir", str(tmp_path / "out")]
    args += ["--checkpoint_path", str(wav2lip_checkpoint), "--detector_path", str(s3fd_weights), "--device", "cpu"]
    gen.main(args)
    out = tmp_path / "out" / "0.mp4"
    info = video.probe(out)
    assert info.has_audio and info.n_frames == 8  # covers the 0.32 s of the audio source
    assert [p.name for p in out.parent.iterdir()] == ["0.mp4"]  # no temporary file left beside it
    mtime = out.stat().st_mtime_ns
    gen.main(args)
    assert out.stat().st_mtime_ns == mtime


def test_options_come_from_the_one_declaration():
    import inference
    from evaluation.gen_videos_from_filelist import parse_args

    base = ["--filelist", "f", "--results_dir", "r", "--data_root", "d", "--checkpoint_path", "c"]
    ours = vars(parse_args(base))
    cli = vars(inference.build_parser().parse_args(["--checkpoint_path", "c", "--face", "f", "--audio", "a"]))
    assert ours["pads"] == [0, 0, 0, 0] and ours["face_det_batch_size"] == 64  # the original protocol's
    assert ours["wav2lip_batch_size"] is None  # 128 on a GPU, 16 on a CPU, as inference.py
    shared = set(ours) & set(cli) - {"pads", "face_det_batch_size"}
    assert len(shared) > 15 and all(ours[k] == cli[k] for k in shared)

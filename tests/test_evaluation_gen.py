"""gen_videos_from_filelist: filelist parsing, sharding, resume, skipped pairs (with a fake generator)."""

from pathlib import Path

import pytest

from errors import UserError
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


def test_shards_cover_every_line_once():
    parts = [gen.shard(10, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(10))


def test_generate_all_resumes_and_skips_failures(tmp_path):
    pairs = [(f"a{i}.mp4", f"v{i}.mp4") for i in range(4)]
    calls = []

    def fake(face, audio, out):
        calls.append(face)
        if face == "v2.mp4":
            raise UserError("v2.mp4: no face detected")
        Path(out).write_text("video")

    out = tmp_path / "results"
    out.mkdir()
    (out / "0.mp4").write_text("already done")
    report = gen.generate_all(pairs, out, fake, [0, 1, 2, 3])
    assert report == {"done": [1, 3], "skipped": [0], "failed": [2]}
    assert calls == ["v1.mp4", "v2.mp4", "v3.mp4"]
    assert sorted(p.name for p in out.iterdir()) == ["0.mp4", "1.mp4", "3.mp4"]


def test_end_to_end_through_the_inference_api(tmp_path):
    """The real pipeline (deterministic Wav2Lip and S3FD weights): one model load, resume on a second run."""
    import torch

    import video
    from tests.detweights import det_state_dict
    from tests.test_video import write_video, write_wav

    root = tmp_path / "lrs2"
    (root / "spk").mkdir(parents=True)
    write_video(root / "spk" / "v1.mp4", 10, audio=write_wav(tmp_path / "t.wav", 0.4))
    write_video(root / "spk" / "a1.mp4", 8, audio=write_wav(tmp_path / "s.wav", 0.32))
    (tmp_path / "list.txt").write_text("spk/a1 spk/v1\n")
    ckpt, s3fd = tmp_path / "w2l.pth", tmp_path / "s3fd.pth"
    torch.save({"state_dict": det_state_dict("Wav2Lip"), "optimizer": None, "global_step": 0, "global_epoch": 0}, ckpt)
    torch.save(det_state_dict("s3fd"), s3fd)
    args = ["--filelist", str(tmp_path / "list.txt"), "--data_root", str(root), "--results_dir", str(tmp_path / "out")]
    args += ["--checkpoint_path", str(ckpt), "--detector_path", str(s3fd), "--device", "cpu"]
    gen.main(args)
    out = tmp_path / "out" / "0.mp4"
    info = video.probe(out)
    assert info.has_audio and info.n_frames == 8  # covers the 0.32 s of the audio source
    mtime = out.stat().st_mtime_ns
    gen.main(args)
    assert out.stat().st_mtime_ns == mtime

"""bench/gpu_check.py: one line and exit 0 without CUDA; with --allow_cpu every step runs on the CPU.

The CPU run exercises the step code (the CPU against itself, tiny sizes); the helpers that only a GPU
reaches (filling the card, TF32 off) are driven here with stand-ins.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import gpu_check, gpu_steps
from face_detection import Box


def run_check(repo, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.gpu_check", *args]
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the checks instead")
def test_without_cuda_one_line_and_exit_0(repo, tmp_path):
    r = run_check(repo, "--out", str(tmp_path / "never.json"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [gpu_check.NO_CUDA]
    assert not (tmp_path / "never.json").exists()


@pytest.fixture(scope="module")
def cpu_run(repo, tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """The whole check on the CPU, once; a budget large enough that no step is cut on a slow machine."""
    out = tmp_path_factory.mktemp("gpu_check") / "report.json"
    r = run_check(repo, "--device", "cpu", "--allow_cpu", "--quick", "--budget", "600", "--out", str(out))
    assert out.is_file(), r.stdout + r.stderr
    return r, json.loads(out.read_text())


def test_cpu_run_lists_every_step_and_none_fails(cpu_run):
    r, report = cpu_run
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == [s.name for s in gpu_check.STEPS]
    failed = {name: s["figure"] for name, s in steps.items() if s["status"] not in ("PASS", "SKIP")}
    assert not failed, failed
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(s["figure"] for s in steps.values())  # every SKIP says why
    assert not any(s["figure"].startswith("budget") for s in steps.values())
    table = r.stdout.splitlines()
    assert table[1].split() == ["step", "status", "time", "figure"]
    assert sum(line.startswith(tuple(steps)) for line in table) == len(steps)
    assert report["counts"]["FAIL"] == 0 and report["environment"]["device"] == "cpu"


def test_cpu_run_figures(cpu_run):
    steps = {s["step"]: s for s in cpu_run[1]["steps"]}
    for name in ("inference fp32 --box", "inference fp32 detect"):
        assert steps[name]["status"] == "PASS"
        psnr = steps[name]["data"]["psnr_db"]  # the CPU against itself: identical frames
        assert psnr == "inf" or psnr >= 45
        assert steps[name]["data"]["frames_compared"] == steps[name]["data"]["frames"] > 0
    assert steps["inference fp32 detect"]["data"]["faces"] > 0  # the detection path pasted faces
    assert steps["s3fd boxes"]["status"] == "PASS" and steps["s3fd boxes"]["data"]["max_diff_px"] == 0
    oom = steps["oom halving"]
    assert oom["status"] == "SKIP" and "no real out-of-memory on a CPU" in oom["figure"]
    assert oom["data"]["batch_limit"] < oom["data"]["first_batch"]
    assert oom["data"]["psnr_db"] == "inf" or oom["data"]["psnr_db"] >= 45  # other batch sizes: round-off only
    lse = steps["lse"]
    assert lse["status"] == "PASS" and lse["data"]["cpu"] == lse["data"]["device"]
    for name in ("inference fp16 --box", "speed generator fp16", "train expert fp16", "speed train step bf16"):
        assert steps[name]["status"] == "SKIP" and "needs CUDA" in steps[name]["figure"]
    assert (
        steps["ddp nccl (torchrun)"]["status"] == "SKIP" and "nccl needs CUDA" in steps["ddp nccl (torchrun)"]["figure"]
    )
    for name in ("train expert bf16", "train generator+gan bf16"):  # ran in float32: losses and checkpoints checked
        assert steps[name]["status"] == "SKIP" and "checkpoints load on the CPU" in steps[name]["figure"]
        assert all(math.isfinite(v) for v in steps[name]["data"]["last"].values())
    for name in ("speed generator fp32", "speed s3fd 1080p", "speed inference.py --box 1080p"):
        assert steps[name]["status"] == "PASS"
    assert all(v > 0 for v in steps["speed generator fp32"]["data"]["frames_per_s"].values())
    assert steps["speed train step fp32"]["status"] == "PASS"


# --- helpers only a GPU reaches, with stand-ins ----------------------------------------------------------------


def test_fill_card_leaves_about_what_was_asked(monkeypatch):
    """A card of 10 GiB with no free block over 6 GiB: a refused request is halved, then the rest is taken."""
    pool = {"free": 10 << 30}

    def empty(n, dtype=None, device=None):
        if n > min(pool["free"], 6 << 30):
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        pool["free"] -= n
        return n

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (pool["free"], 10 << 30))
    monkeypatch.setattr(torch, "empty", empty)
    blocks = gpu_steps.fill_card(torch.device("cuda"), 200 << 20)
    assert len(blocks) >= 2  # the first request was refused, then halved
    assert 200 << 20 <= pool["free"] <= (200 << 20) + (64 << 20)


def test_card_full_measures_a_frame_and_leaves_room_for_a_few(monkeypatch):
    """The memory left free is `frames_fit` times the generator's peak per frame, measured on 16 frames."""
    pool = {"free": 8 << 30, "allocated": 0, "peak": 0}

    def empty(n, dtype=None, device=None):
        if n > pool["free"]:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        pool["free"] -= n
        return n

    def predict(faces, mels):
        pool["peak"] = pool["allocated"] + len(faces) * (10 << 20)  # 10 MiB a frame
        return faces

    for name, fn in {"synchronize": lambda device=None: None, "empty_cache": lambda: None,
                     "reset_peak_memory_stats": lambda device=None: None,
                     "memory_allocated": lambda device=None: pool["allocated"],
                     "max_memory_allocated": lambda device=None: pool["peak"],
                     "mem_get_info": lambda device=None: (pool["free"], 8 << 30)}.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(torch, "empty", empty)
    generator = SimpleNamespace(device=torch.device("cuda"), predict=predict)
    sync = SimpleNamespace(generator=generator, hp=SimpleNamespace(img_size=96))
    with gpu_steps.card_full(sync, frames_fit=6) as note:
        assert pool["free"] == 60 << 20
    assert note == "10.0 MiB a frame, 60 MiB left free"


def test_tf32_off_restores_the_flags():
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with gpu_steps.tf32_off():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_region_psnr_compares_pasted_faces_with_equal_boxes():
    frames = [np.full((20, 20, 3), 100, np.uint8) for _ in range(3)]
    other = [f.copy() for f in frames]
    other[0][5, 5, 0] = 101  # one level off inside the box
    other[1][0, 0, 0] = 0  # outside the box: not a face pixel
    box, moved = Box(2, 2, 12, 12), Box(3, 2, 13, 12)
    psnr, compared, worst = gpu_steps.region_psnr(frames, other, [box, box, box], [box, box, moved])
    assert (compared, worst) == (2, 1)  # the third frame's box moved by a pixel: not compared
    assert psnr == pytest.approx(10 * math.log10(255**2 * 2 * 300))
    assert gpu_steps.region_psnr(frames, frames, [None], [None])[0] == math.inf
    with pytest.raises(gpu_steps.Failed, match="a face on one device only"):
        gpu_steps.region_psnr(frames, frames, [box], [None])


def test_report_is_plain_json():
    value = gpu_check.jsonable({"psnr": math.inf, "n": np.int64(3), 1: (np.float32(0.5), None)})
    assert json.loads(json.dumps(value, allow_nan=False)) == {"psnr": "inf", "n": 3, "1": [0.5, None]}

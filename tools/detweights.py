"""Deterministic weights and formula inputs of the golden vectors (tests/data/golden/*.json).

The goldens were computed by the original code with weights that depend only on each state-dict key and
shape, so our modules can be checked against them without any pretrained file. Tests and benches both
use these weights, so the module lives in tools/ and no bench imports a test module.

As a command, it writes them as stand-in weight files where the scripts look for the real ones, so a
newcomer sees the pipeline run before downloading anything (README, "Try it without weights"):

    python -m tools.detweights    # checkpoints/wav2lip_gan.pth, face_detection/detection/sfd/s3fd.pth
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"  # the goldens and test media live with the tests
GOLDEN = DATA / "golden"
SPEC = DATA / "spec"

GAINS = {"Wav2Lip": 4.0, "SyncNet_color": 4.0, "syncnet_python_S": 4.0, "Wav2Lip_disc_qual": 6.0, "s3fd": 3.0,
         "RRDBNet": 1.0, "BiSeNet": 4.0, "GFPGANv1Clean": 1.0, "CodeFormer": 4.0}  # fmt: skip
LATER_ARCHS = {"RRDBNet", "BiSeNet", "GFPGANv1Clean", "CodeFormer"}  # the HQ and restoration networks' extra rules

_GOLDEN_RATIO = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def load_golden(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.json").read_text())


def load_spec(name: str) -> list[tuple[str, list[int], str]]:
    return [tuple(e) for e in json.loads((SPEC / f"{name}.json").read_text())["entries"]]


def uniform(key: str, n: int) -> np.ndarray:
    """SplitMix64 seeded with crc32(key): n floats in [-1, 1), exact in float64."""
    seed = np.uint64(zlib.crc32(key.encode("utf-8")))
    i = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = seed + i * _GOLDEN_RATIO
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    f = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return 2.0 * f - 1.0


def det_value(key: str, shape: list[int], gain: float, later: bool = False) -> torch.Tensor:
    """The value of one state-dict entry: the first matching rule of the goldens' README wins. With `later`
    (the HQ and restoration networks), three rules come first: noise buffers, modulated convs, attention biases."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    n = int(np.prod(shape)) if shape else 1
    u = uniform(key, n)
    leaf = key.rsplit(".", 1)[-1]
    if later and len(shape) == 4 and leaf.startswith("noise"):
        v = u
    elif later and len(shape) == 5:
        v = u * math.sqrt(gain / int(np.prod(shape[2:])))
    elif (later and len(shape) == 1 and leaf.endswith("bias") and leaf != "bias") or leaf == "running_mean":
        v = 0.05 * u
    elif leaf == "running_var":
        v = 1.0 + 0.5 * np.abs(u)
    elif len(shape) >= 2:
        v = u * math.sqrt(gain / int(np.prod(shape[1:])))
    elif leaf == "bias":
        v = 0.05 * u
    elif key.endswith("_norm.weight"):
        v = 8.0 * (1.0 + 0.1 * u)
    else:
        v = 1.0 + 0.1 * u
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def det_state_dict(arch: str) -> OrderedDict[str, torch.Tensor]:
    """The deterministic state dict of `arch` (a name of tests/data/spec), in spec order."""
    gain = GAINS[arch]
    return OrderedDict((k, det_value(k, s, gain)) for k, s, _ in load_spec(arch))


def det_weights_like(module: torch.nn.Module, arch: str) -> OrderedDict[str, torch.Tensor]:
    """The deterministic state dict of `module`'s own keys and shapes, in its own order, with `arch`'s gain:
    for the HQ and restoration networks, whose goldens list no spec (their keys are the reference's)."""
    gain, later = GAINS[arch], arch in LATER_ARCHS
    return OrderedDict((k, det_value(k, list(v.shape), gain, later)) for k, v in module.state_dict().items())


def formula(shape: list[int], off: float, amp: float, freq: float, phase: float) -> torch.Tensor:
    i = np.arange(int(np.prod(shape)), dtype=np.float64)
    x = off + amp * np.sin(freq * i + phase)
    return torch.from_numpy(x.astype(np.float32).reshape(shape))


def formula_input(spec: dict) -> torch.Tensor:
    """A golden's recorded input (`shape`, `off`, `amp`, `freq`, `phase`) rebuilt as a tensor."""
    return formula(spec["shape"], spec["off"], spec["amp"], spec["freq"], spec["phase"])


def assert_stats(actual, stats: dict, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Compare a tensor against a golden `stats` record; returns the max |deviation| seen."""
    a = np.asarray(actual.detach().cpu() if isinstance(actual, torch.Tensor) else actual)
    assert list(a.shape) == list(stats["shape"]), (a.shape, stats["shape"])
    flat = a.reshape(-1).astype(np.float64)
    n = flat.size
    worst = 0.0

    def check(got: np.ndarray, want, what: str) -> None:
        nonlocal worst
        want = np.asarray(want, dtype=np.float64)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)
        worst = max(worst, float(np.max(np.abs(got - want))) if want.size else 0.0)

    check(flat[:16], stats["first16"][: min(16, n)], "first16")
    idx = [int(k) for k in stats["at_flat_index"]]
    check(flat[idx], list(stats["at_flat_index"].values()), "at_flat_index")
    if "sample" in stats:
        stride = stats["sample_stride"]
        check(flat[::stride][: len(stats["sample"])], stats["sample"], "sample")
    check(np.array([flat.mean(), flat.min(), flat.max()]), [stats["mean"], stats["min"], stats["max"]], "moments")
    np.testing.assert_allclose(flat.std(), stats["std"], rtol=max(rtol, 1e-4), atol=atol, err_msg="std")
    np.testing.assert_allclose(flat.sum(), stats["sum"], rtol=max(rtol, 1e-4), atol=max(atol, 1e-3 * math.sqrt(n)))
    return worst


# Stand-ins for Wav2Lip-HQ's two networks, so that the whole HQ path (and the fork's own code, for the parity
# numbers in tests/data/hq) runs on image-like values without any released file. Each is the deterministic
# state dict above with a documented tweak; they are not models of anything.
SR_WEIGHT_SCALE = 0.05  # every deterministic RRDBNet weight and bias ×0.05: a small random texture...
SR_BODY_GAIN = 0.1  # ...and conv_body ×0.1 more: 23 RRDBs (each ~1.2× identity) would otherwise grow it ~66×
SR_CONTRAST, SR_OFFSET = 1.25, -0.1  # conv_last's identity path: y ≈ 1.25·x - 0.1, so both clamps are reached
PARSER_BACKGROUND_GAIN = 0.5  # the main head's background row (class 0) ×0.5 ...
PARSER_FACE_GAIN = 1.25  # ... and its skin, mouth and lip rows (1, 11, 12, 13) ×1.25
PARSER_FACE_CLASSES = (1, 11, 12, 13)


def sr_stand_in(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """RRDBNet weights (any size, ×4, ×2 or ×1: `model`'s own keys) whose output is an image: the
    deterministic weights, scaled down, plus an identity path through channels 0-2 of every outer conv.

    The input lies in [0, 1] and LeakyReLU passes non-negative values unchanged, so the network computes
    about nearest-×scale(input)·1.25 - 0.1 (below 0 for dark pixels, above 1 for bright ones: both ends of
    the output clamp are used) plus a small, content-dependent texture from all of its blocks. For ×2
    and ×1 models (pixel-unshuffled inputs), the identity reads the first pixel of each folded block.
    """
    sd = OrderedDict((k, v * SR_WEIGHT_SCALE) for k, v in det_weights_like(model, "RRDBNet").items())
    sd["conv_body.weight"] *= SR_BODY_GAIN
    sd["conv_body.bias"] *= SR_BODY_GAIN
    folded = sd["conv_first.weight"].shape[1] // 3  # input channels per colour (1, 4 or 16)
    for name in ("conv_first", "conv_up1", "conv_up2", "conv_hr", "conv_last"):
        weight, step = sd[f"{name}.weight"], folded if name == "conv_first" else 1
        for c in range(3):
            weight[c, c * step, 1, 1] += SR_CONTRAST if name == "conv_last" else 1.0
    sd["conv_last.bias"][:3] += SR_OFFSET
    return sd


def parser_stand_in(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """BiSeNet weights whose parse of a face crop selects a face-shaped part of it: the deterministic
    weights, with the main head's background row weakened and its face rows strengthened. On the test
    media's drawn face and on real faces (mt_sun) about 60 % of the 512×512 parse is skin, mouth or lips,
    with eyes, brows, hair and the drawn mouth left out: edges for a mask test to see."""
    sd = det_weights_like(model, "BiSeNet")
    head = sd["conv_out.conv_out.weight"]
    head[0] *= PARSER_BACKGROUND_GAIN
    head[list(PARSER_FACE_CLASSES)] *= PARSER_FACE_GAIN
    return sd


# --- stand-in weight files: `python -m tools.detweights` -------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
STAND_INS = {"Wav2Lip": "wav2lip_gan.pth", "s3fd": "s3fd.pth"}  # what inference.py reads by default
STAND_IN_NOTE = (
    "STAND-IN weights (deterministic, untrained; the tests' weights): the mouth comes out as a noise patch "
    "and the detector finds no real face, so pass --box (README, 'Try it without weights'); put the real "
    "files in their place for real results (README, 'Checkpoints')"
)


def stand_in_container(arch: str) -> dict:
    """What a stand-in file holds: the generator in the original training container, S3FD as the raw state
    dict of the released s3fd.pth; each loads where the real file does."""
    weights = det_state_dict(arch)
    if arch == "s3fd":
        return weights
    return {"state_dict": weights, "optimizer": None, "global_step": 0, "global_epoch": 0}


def is_stand_in(path: Path, arch: str) -> bool:
    """Whether `path` holds exactly `arch`'s deterministic weights (so it may be rewritten)."""
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours to overwrite
        return False
    found = found.get("state_dict", found) if isinstance(found, dict) else None
    want = det_state_dict(arch)
    return isinstance(found, dict) and list(found) == list(want) and all(torch.equal(found[k], want[k]) for k in want)


def check_replaceable(path: Path, arch: str) -> None:
    """A file at `path` that is not `arch`'s stand-in is refused in one line: it may be the real weights."""
    from common.errors import UserError

    if path.exists() and not is_stand_in(path, arch):
        raise UserError(
            f"{path}: a file is already there and it is not a stand-in (real weights?): not overwritten; move it "
            "away, or write the stand-ins elsewhere with --out / --detector_out"
        )


def write_stand_ins(targets: dict[str, Path]) -> list[Path]:
    """Write each arch's stand-in at its path (atomically), after checking that none would replace a file
    that is not a stand-in: all of them or none."""
    from common.atomic_files import atomic_path

    for arch, path in targets.items():
        check_replaceable(path, arch)
    for arch, path in targets.items():
        with atomic_path(path) as tmp:
            torch.save(stand_in_container(arch), tmp)
    return list(targets.values())


def build_parser() -> argparse.ArgumentParser:
    from face_detection.detection.sfd.sfd_detector import default_weights_path

    p = argparse.ArgumentParser(
        prog="python -m tools.detweights",
        description="Write stand-in weights where the scripts look for the real ones, to see the pipeline run "
        "without downloading anything. " + STAND_IN_NOTE + ".",
    )
    p.add_argument(
        "--out", default=str(REPO / "checkpoints"), help="folder for wav2lip_gan.pth (default: checkpoints/)"
    )
    p.add_argument("--detector_out", default=str(default_weights_path()),
                   help="the S3FD file (default: face_detection/detection/sfd/s3fd.pth, where face detection looks)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    targets = {"Wav2Lip": Path(args.out) / STAND_INS["Wav2Lip"], "s3fd": Path(args.detector_out)}
    for path in write_stand_ins(targets):
        print(f"wrote {path}")
    print(STAND_IN_NOTE)


if __name__ == "__main__":
    if __package__ in (None, ""):  # run by path (python tools/detweights.py): the repository root is not on the path
        sys.path.insert(0, str(REPO))
    from common.errors import run_cli

    run_cli(main)

"""Loading Wav2Lip-HQ's two weight files, with the project's one-line errors.

- ESRGAN (`--sr_path`): BasicSR's container, `{"params": ...}` (the fork's esrgan_yunying.pth) or
  `{"params_ema": ...}` (Real-ESRGAN's RealESRGAN_x4plus.pth / x2plus.pth); the network's size and scale
  are read from the shapes (`models.rrdbnet.rrdbnet_config`), so ×4, ×2 and ×1 files all load.
- The face parser (`--segmentation_path`): a raw BiSeNet state dict (face-parsing.PyTorch's 79999_iter.pth,
  the fork's face_segmentation.pth).

Both are read weights-only (`common.weights.read_file`); a missing file names where it goes and where the
README says to get it, and any other model's file (a Wav2Lip checkpoint given as `--sr_path`...) is named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from common.errors import UserError
from common.weights import ARCHS, describe, read_file, skeleton, state_dict_of, strip_module_prefix
from models.bisenet import BiSeNet, bisenet_config
from models.rrdbnet import RRDBNet, rrdbnet_config

SR_FLAG, PARSER_FLAG = "--sr_path", "--segmentation_path"


def what_it_holds(obj: object) -> str:
    """What a loaded weight file is, for an error: one of the project's models (in any of its containers,
    `common.weights.state_dict_of`), a known other one, or neither."""
    try:
        return describe(state_dict_of(obj, ""))
    except UserError:
        return "not weights of any model of this project"


def load_rrdbnet(path: str | os.PathLike, flag: str = SR_FLAG) -> RRDBNet:
    """The ESRGAN of `path`, its architecture read from the file, on the CPU in eval mode."""
    obj = read_file(path, "RRDBNet", flag)
    try:
        weights = state_dict_of(obj, path)  # `params_ema` first, then `params` (BasicSR's), or a raw state dict
        model = skeleton(lambda: RRDBNet(**rrdbnet_config(weights)))
        model.load_state_dict(weights, strict=True, assign=True)
    except (UserError, ValueError, RuntimeError):
        raise UserError(f"{path}: this is {what_it_holds(obj)}; {flag} expects ESRGAN's RRDBNet "
                        f"({ARCHS['RRDBNet'].files})") from None  # fmt: skip
    return model.eval()


def load_bisenet(path: str | os.PathLike, flag: str = PARSER_FLAG) -> BiSeNet:
    """The face parser of `path`, on the CPU in eval mode (its BatchNorm must use the running statistics)."""
    obj = read_file(path, "BiSeNet", flag)
    try:
        if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError("not a raw state dict")
        weights = strip_module_prefix(obj)
        model = skeleton(lambda: BiSeNet(**bisenet_config(weights)))
        model.load_state_dict(weights, strict=True, assign=True)
    except (ValueError, RuntimeError):
        raise UserError(f"{path}: this is {what_it_holds(obj)}; {flag} expects the BiSeNet face parser "
                        f"({ARCHS['BiSeNet'].files})") from None  # fmt: skip
    return model.eval()

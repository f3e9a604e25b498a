"""Fixtures shared by several test files; each is small and documented in one line.

The deterministic weights come from tools/detweights.py (shared with bench/); the goldens and test media
live in tests/data.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from tools.detweights import det_state_dict

REPO = Path(__file__).resolve().parent.parent  # the repository root, where the scripts live


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root: the working directory of a script run as a subprocess."""
    return REPO


@pytest.fixture(scope="session")
def wav2lip_weights() -> OrderedDict[str, torch.Tensor]:
    """The deterministic Wav2Lip state dict, built once: copy it before changing it."""
    return det_state_dict("Wav2Lip")


@pytest.fixture(scope="session")
def wav2lip_checkpoint(tmp_path_factory, wav2lip_weights) -> Path:
    """A Wav2Lip checkpoint file of the deterministic weights, in the original training container."""
    path = tmp_path_factory.mktemp("wav2lip") / "wav2lip_det.pth"
    torch.save({"state_dict": wav2lip_weights, "optimizer": None, "global_step": 0, "global_epoch": 0}, path)
    return path


@pytest.fixture(scope="session")
def s3fd_weights(tmp_path_factory) -> Path:
    """An S3FD weights file (a raw state dict, as the released s3fd.pth) of the deterministic weights."""
    path = tmp_path_factory.mktemp("s3fd") / "s3fd.pth"
    torch.save(det_state_dict("s3fd"), path)
    return path


@pytest.fixture(scope="session")
def esrgan_small(tmp_path_factory) -> Path:
    """A small ×4 ESRGAN (16 features, 2 blocks: the pipeline's tests need speed, not the real size) of the
    stand-in weights, in BasicSR's container as esrgan_yunying.pth."""
    from models.rrdbnet import RRDBNet
    from tools.detweights import sr_stand_in

    path = tmp_path_factory.mktemp("esrgan") / "esrgan_small.pth"
    torch.save({"params": sr_stand_in(RRDBNet(num_feat=16, num_block=2, num_grow_ch=8))}, path)
    return path


@pytest.fixture(scope="session")
def parser_weights(tmp_path_factory) -> Path:
    """A face-parser file (a raw BiSeNet state dict, as face_segmentation.pth) of the stand-in weights."""
    from models.bisenet import BiSeNet
    from tools.detweights import parser_stand_in

    path = tmp_path_factory.mktemp("bisenet") / "face_segmentation.pth"
    torch.save(parser_stand_in(BiSeNet()), path)
    return path

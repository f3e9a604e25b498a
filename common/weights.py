"""Reading and writing every weight file of the project, official or ours, with errors that say the fix.

Containers (read the README's "Checkpoints" section):
- training checkpoints, `{"state_dict", "optimizer", "global_step", "global_epoch"}` (+ our extra keys),
  for Wav2Lip, SyncNet_color and Wav2Lip_disc_qual; keys may carry DataParallel's `module.`;
- raw state dicts: S3FD's `s3fd.pth` and syncnet_python's `syncnet_v2.model`;
- BasicSR's `{"params_ema": sd}` or `{"params": sd}` (GFPGAN, CodeFormer): the EMA weights when both are
  there, as both projects' own loaders prefer them.

A file is recognised by its keys, so handing one model's file to another fails with a sentence naming
both, not with a 300-line `load_state_dict` report. Checkpoints are written atomically: killing the
process at any moment leaves the previous file intact.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from common.atomic_files import atomic_path
from common.errors import UserError

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class Arch:
    """What a weight file holds, told apart by one key only that network has."""

    name: str
    marker: str
    files: str  # the official file names
    home: str  # where the user puts them
    source: str  # where the README says to get them


ARCHS = {
    a.name: a
    for a in [
        Arch("Wav2Lip", "face_decoder_blocks.0.0.conv_block.0.weight", "wav2lip.pth / wav2lip_gan.pth",
             "checkpoints/", "README.md, section 'Checkpoints'"),
        Arch("SyncNet_color", "face_encoder.0.conv_block.0.weight", "lipsync_expert.pth",
             "checkpoints/", "README.md, section 'Checkpoints'"),
        Arch("Wav2Lip_disc_qual", "binary_pred.0.weight", "visual_quality_disc.pth",
             "checkpoints/", "README.md, section 'Checkpoints'"),
        Arch("s3fd", "fc7.weight", "s3fd.pth",
             "face_detection/detection/sfd/", "README.md, section 'Checkpoints'"),
        Arch("syncnet_python_S", "netcnnaud.0.weight", "syncnet_v2.model",
             "evaluation/", "evaluation/README.md"),
        Arch("RRDBNet", "body.0.rdb1.conv1.weight", "esrgan_yunying.pth / RealESRGAN_x4plus.pth",
             "checkpoints/", "README.md, section 'HQ'"),
        Arch("BiSeNet", "cp.arm16.conv_atten.weight", "face_segmentation.pth (79999_iter.pth)",
             "checkpoints/", "README.md, section 'HQ'"),
        Arch("GFPGANv1Clean", "stylegan_decoder.style_conv1.bias", "GFPGANv1.4.pth",
             "checkpoints/", "README.md, section 'Restoration'"),
        Arch("CodeFormer", "ft_layers.0.self_attn.in_proj_weight", "codeformer.pth",
             "checkpoints/", "README.md, section 'Restoration'"),
    ]
}  # fmt: skip
# Files of networks this project does not run, named when one is handed over by mistake (marker key → what).
FOREIGN = {
    "stylegan_decoder.style_conv1.activate.bias": "GFPGAN's original architecture (GFPGANv1.pth, the paper model, "
    "or GFPGANBilinear)",
    "encoder.conv_in.weight": "RestoreFormer",
    "quantize.embedding.weight": "VQGAN (CodeFormer's stage I, vqgan_code1024.pth)",
}
BASICSR_KEYS = ("params_ema", "params")  # BasicSR's containers, preferred first (GFPGAN's and CodeFormer's loaders)


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DataParallel's `module.` wherever it stands in a key, as every original loader did."""
    return {k.replace("module.", ""): v for k, v in state_dict.items()}


def identify(state_dict: Mapping[str, object]) -> str | None:
    """The architecture whose marker key the state dict holds, or None."""
    keys = set(strip_module_prefix(state_dict))
    return next((a.name for a in ARCHS.values() if a.marker in keys), None)


def describe(state_dict: Mapping[str, object]) -> str:
    """What a state dict is, for an error: one of our architectures, a known foreign one, or neither."""
    if found := identify(state_dict):
        return f"a {found} checkpoint"
    foreign = next((what for marker, what in FOREIGN.items() if marker in state_dict), None)
    return f"a checkpoint of {foreign}" if foreign else "not a checkpoint of any model of this project"


def missing_file_message(path: str | os.PathLike, arch: str, flag: str = "--checkpoint_path") -> str:
    a = ARCHS[arch]
    return (
        f"{path}: file not found. It should hold {arch} weights ({a.files}): put the file in {a.home} "
        f"or pass its path with {flag}; {a.source} says where to download it"
    )


def read_file(path: str | os.PathLike, arch: str, flag: str = "--checkpoint_path") -> object:
    """torch.load a weight file onto the CPU with `weights_only=True`: see `safe_load`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(missing_file_message(path, arch, flag))
    return safe_load(path, f"download {ARCHS[arch].files} again")


UNSAFE = "Weights only load failed"  # how torch's restricted unpickler says a file holds more than weights


def safe_load(path: str | os.PathLike, fix: str) -> object:
    """The tensors, dicts, lists and numbers of a weight file, never anything else: a file that holds
    other Python objects (which is how a crafted `.pth` runs code when unpickled) is refused, not read.

    Raises a one-line `UserError` ending with `fix` (where to get a good file) for a damaged or a
    refused file; the two say different things, since re-downloading a hostile file does not help.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if UNSAFE in str(e):
            raise UserError(refused_message(path, e, fix)) from None
        raise UserError(damaged_message(path, e, fix)) from None
    except Exception as e:  # noqa: BLE001 - torch reports damage as any of a dozen exception types
        raise UserError(damaged_message(path, e, fix)) from None


def refused_message(path: str | os.PathLike, e: BaseException, fix: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    what = f" such as {found.group(1)}" if found else ""
    return (
        f"{path}: refused for safety: the file holds more than weights (Python objects{what}, which loading "
        f"would run), so it was not loaded; use a file from a source you trust ({fix})"
    )


def damaged_message(path: str | os.PathLike, e: BaseException, fix: str) -> str:
    return f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}), probably truncated or damaged; {fix}"


def mismatch_report(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which keys are missing, unexpected or of the wrong shape, in a few words (empty when they fit)."""
    own = model.state_dict()
    parts = []
    if missing := [k for k in own if k not in state_dict]:
        parts.append(f"missing {_few(missing)}")
    if unexpected := [k for k in state_dict if k not in own]:
        parts.append(f"unexpected {_few(unexpected)}")
    shapes = [
        f"{k} {list(v.shape)} (model {list(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if shapes:
        parts.append(f"wrong shape {_few(shapes)}")
    return "; ".join(parts)


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def state_dict_of(obj: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a training container, a BasicSR container or a raw state dict, with `module.` removed."""
    for key in ("state_dict", *BASICSR_KEYS):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()) or not obj:
        raise UserError(f"{path}: holds no state dict (expected a dict of tensors, or one under 'state_dict', "
                        "'params_ema' or 'params')")  # fmt: skip
    return strip_module_prefix(obj)


def load_weights(
    model: nn.Module, path: str | os.PathLike, arch: str, flag: str = "--checkpoint_path", strict: bool = True
) -> dict:
    """Load `path` into `model` (of architecture `arch`); returns the whole container for resuming.

    Raises a one-line `UserError` for a missing, damaged or wrong-model file.
    """
    obj = read_file(path, arch, flag)
    state_dict = state_dict_of(obj, path)
    check_fits(model, state_dict, arch, path, flag, strict)
    if on_meta := any(p.is_meta for p in model.parameters()):
        own = model.state_dict()
        state_dict = {k: v.to(own[k].dtype) if k in own else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=strict, assign=on_meta)
    return obj if isinstance(obj, dict) and "state_dict" in obj else {"state_dict": state_dict}


def check_fits(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], arch: str, path: str | os.PathLike, flag: str,
    strict: bool = True,
) -> None:  # fmt: skip
    """A one-line `UserError` unless `state_dict` is `arch`'s and fits `model` (every key, every shape)."""
    if identify(state_dict) != arch:
        raise UserError(f"{path}: this is {describe(state_dict)}; {flag} expects {arch} ({ARCHS[arch].files})")
    report = mismatch_report(model, state_dict)
    if report and (strict or "wrong shape" in report):
        raise UserError(f"{path}: {arch} weights that do not fit the model: {report}; use {ARCHS[arch].files}")


def skeleton(cls: Callable[[], M]) -> M:
    """`cls()` on the meta device: no memory, no random initialisation (0.3 s for the generator), for
    a strict `load_weights` to give it the checkpoint's tensors."""
    with torch.device("meta"):
        return cls()


def load_model(
    model: nn.Module,
    path: str | os.PathLike,
    arch: str,
    device: torch.device | str = "cpu",
    flag: str = "--checkpoint_path",
) -> nn.Module:
    """`model` with the weights of `path`, on `device`, in eval mode: what inference and evaluation need."""
    load_weights(model, path, arch, flag)
    return model.to(device).eval()


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    global_step: int,
    global_epoch: int,
    **extra: object,
) -> None:
    """Write the original container (+ `extra` keys such as hparams) atomically.

    Models wrapped in DDP are saved without their `module.` prefix, so the original code reads ours.
    """
    model = getattr(model, "module", model)
    checkpoint = {
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "global_step": global_step,
        "global_epoch": global_epoch,
        **extra,
    }
    atomic_save(checkpoint, path)


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save through a temporary file, fsynced and renamed over `path` (files.atomic_path)."""
    with atomic_path(path, durable=True) as tmp:
        torch.save(obj, tmp)

"""The inference engine: Wav2Lip's pipeline as a stream of stages, and its Python API.

    from lipsync import LipSync, ModelOptions
    sync = LipSync(ModelOptions(checkpoint_path="checkpoints/wav2lip_gan.pth"))
    print(sync("face.mp4", "speech.wav", "out.mp4").line())

The stages live in their own modules (frames, face_boxes, crops, generation, ...) and `pipeline` composes
them. The names below are imported on first use, so that a script's `--help` does not load torch.
"""

from __future__ import annotations

import importlib

_API = {"LipSync": "pipeline", "Summary": "pipeline", "lipsync": "pipeline", "ModelOptions": "options",
        "Options": "options"}  # fmt: skip
__all__ = list(_API)


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module 'lipsync' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lipsync.{_API[name]}"), name)

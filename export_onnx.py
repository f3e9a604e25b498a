"""Export Wav2Lip's networks to ONNX: the generator, S3FD, Wav2Lip-HQ's ESRGAN and face parser, the face
restorers GFPGAN v1.4 and CodeFormer, and syncnet_python's SyncNet.

    python export_onnx.py --model wav2lip --checkpoint_path checkpoints/wav2lip_gan.pth
    python export_onnx.py --model s3fd --checkpoint_path face_detection/detection/sfd/s3fd.pth
    python export_onnx.py --model syncnet --checkpoint_path syncnet_v2.model
    python export_onnx.py --model esrgan --checkpoint_path checkpoints/esrgan_yunying.pth
    python export_onnx.py --model bisenet --checkpoint_path checkpoints/face_segmentation.pth
    python export_onnx.py --model gfpgan --checkpoint_path checkpoints/GFPGANv1.4.pth
    python export_onnx.py --model codeformer --checkpoint_path checkpoints/codeformer.pth
    # → checkpoints/wav2lip_gan.onnx, checkpoints/s3fd.onnx, ... (--out to choose another path)

The batch axis is dynamic (S3FD's, ESRGAN's and the face parser's height and width too). Each
export is checked with `onnx.checker` and against PyTorch on random inputs, then renamed into place: a
failed run leaves no file. Run the files with
`inference.py --backend onnxruntime --onnx_path ... --detector_onnx_path ... --sr_onnx_path ...
--segmentation_onnx_path ... --enhancer_onnx_path ...` (README, "ONNX").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import run_cli

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
MODELS = ("wav2lip", "s3fd", "esrgan", "bisenet", "gfpgan", "codeformer", "syncnet")  # the engine's, then evaluation's


def specs() -> dict:
    """Every exportable network's `common.onnx_export.Spec`, by `--model` name."""
    from evaluation.onnx_syncnet import SPECS as EVALUATION
    from lipsync.onnx_models import SPECS as ENGINE

    return {**ENGINE, **EVALUATION}


def default_out(checkpoint_path: str) -> Path:
    """checkpoints/NAME.onnx beside the weights the scripts read (git ignores `*.onnx`), whatever the
    working directory: an export never lands in the repository's root."""
    return CHECKPOINTS / f"{Path(checkpoint_path).stem}.onnx"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a network of Wav2Lip to ONNX")
    p.add_argument("--model", required=True, choices=MODELS, help="which network the checkpoint holds")
    p.add_argument("--checkpoint_path", required=True, help="the network's weight file (see --model)")
    p.add_argument(
        "--out",
        help="the .onnx file to write (its folder is created; default: checkpoints/NAME.onnx, "
        "NAME the checkpoint's file name)",
    )
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from common.onnx_export import OPSET, export

    out = export(specs()[args.model], args.checkpoint_path, args.out or default_out(args.checkpoint_path))
    if not args.quiet:
        print(f"wrote {out} ({args.model}, opset {OPSET}, dynamic batch; checked against PyTorch)")


if __name__ == "__main__":
    run_cli(main)

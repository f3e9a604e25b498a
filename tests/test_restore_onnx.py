"""GFPGAN and CodeFormer through ONNX: `export_onnx.py --model gfpgan|codeformer` from weights in the released
layout (`{"params_ema": sd}`), the interface both references' scripts feed (the face (N, 3, 512, 512), RGB in
[-1, 1]; CodeFormer's w a float tensor of shape [1]), ONNX Runtime's outputs against the reference code's
goldens, and `--backend onnxruntime` running the export.

Each network is exported once per session (1-4 minutes each on 2 cores: the trace, and the export's own check
of a batch of 2 against PyTorch); a real network runs on one face per test.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

import export_onnx
from common.errors import run_cli
from common.weights import skeleton
from lipsync import pipeline as lipsync
from lipsync.onnx_models import OnnxRestorer
from lipsync.options import ModelOptions
from lipsync.restore import DEFAULT_FILES
from lipsync.restorers import ARCH, BUILD, TorchRestorer
from tests.media import face_frame, write_wav
from tools.detweights import assert_stats, det_weights_like, formula_input, load_golden

BOX = [20, 110, 30, 120]  # --box around tests/media.py's drawn face


@pytest.fixture(scope="session")
def restorer_files(tmp_path_factory) -> dict[str, Path]:
    """GFPGANv1.4.pth and codeformer.pth of the golden weights, in the released container."""
    folder = tmp_path_factory.mktemp("restorers")
    files = {}
    for name, file in DEFAULT_FILES.items():
        files[name] = folder / file
        torch.save({"params_ema": det_weights_like(skeleton(BUILD[name]), ARCH[name])}, files[name])
    return files


@pytest.fixture(scope="session")
def exported(restorer_files, tmp_path_factory):
    """`exported(name)`: the network's export through `export_onnx.py`'s main, made once."""
    folder = tmp_path_factory.mktemp("restorer onnx")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            out = folder / f"{name}.onnx"
            export_onnx.main(["--model", name, "--checkpoint_path", str(restorer_files[name]), "--out", str(out),
                              "--quiet"])  # fmt: skip
            made[name] = out
        return made[name]

    return get


def interface(session: ort.InferenceSession) -> tuple[list, list[str]]:
    inputs = [(i.name, i.shape, i.type) for i in session.get_inputs()]
    return inputs, [o.name for o in session.get_outputs()]


def test_gfpgan_onnx_is_the_reference(exported):
    golden = load_golden("gfpgan")
    session = ort.InferenceSession(str(exported("gfpgan")), providers=["CPUExecutionProvider"])
    assert interface(session) == ([("face", ["batch", 3, 512, 512], "tensor(float)")], ["restored"])
    (out,) = session.run(None, {"face": formula_input(golden["input"]).numpy()})
    print(f"gfpgan onnx max |dev| {assert_stats(out, golden['output']):.2e}")


def test_codeformer_onnx_is_the_reference_at_two_fidelities(exported):
    """The image and the chosen codes of the reference at w = 0.5 and at w = 0 (where the fuse is skipped
    exactly), from one graph."""
    golden = load_golden("codeformer")
    session = ort.InferenceSession(str(exported("codeformer")), providers=["CPUExecutionProvider"])
    face = ("face", ["batch", 3, 512, 512], "tensor(float)")
    assert interface(session) == ([face, ("w", [1], "tensor(float)")], ["restored", "logits", "lq_feat"])
    x = formula_input(golden["input"]).numpy()
    for w in ("0.5", "0.0"):
        want = golden[f"w={w}"]
        image, logits, lq_feat = session.run(None, {"face": x, "w": np.array([float(w)], np.float32)})
        dev = [assert_stats(image, want["output"]), assert_stats(logits, want["logits"])]
        assert logits.argmax(-1).reshape(-1).tolist() == want["code_indices"]
        assert_stats(lq_feat, want["lq_feat"])
        print(f"codeformer onnx w={w} max |dev| image {dev[0]:.2e}, logits {dev[1]:.2e}")


def test_onnxruntime_backend_restores_with_the_export(exported, restorer_files, wav2lip_checkpoint, tmp_path):
    """`--backend onnxruntime --enhancer gfpgan --enhancer_onnx_path F`: the restorer runs from the file, and
    its frames are the torch backend's within 2 levels. Two frames: a still at 4 fps, 0.2 s of speech."""
    still, speech = tmp_path / "face.png", write_wav(tmp_path / "speech.wav", 0.2)
    cv2.imwrite(str(still), face_frame(0))
    frames = {}
    for backend in ("torch", "onnxruntime"):
        model = ModelOptions(checkpoint_path=str(wav2lip_checkpoint), device="cpu", backend=backend,
                             enhancer="gfpgan", enhancer_path=str(restorer_files["gfpgan"]),
                             enhancer_onnx_path=str(exported("gfpgan")) if backend == "onnxruntime" else None,
                             cache_dir=str(tmp_path / "cache"))  # fmt: skip
        sync = lipsync.LipSync(model, quiet=True)
        kind = OnnxRestorer if backend == "onnxruntime" else TorchRestorer
        assert isinstance(sync.enhance.steps[0].restore, kind)
        got: list[np.ndarray] = []
        sync(still, speech, tmp_path / f"{backend}.mp4", box=BOX, fps=4, quiet=True,
             on_frame=lambda i, f, got=got: got.append(f.copy()))  # fmt: skip
        frames[backend] = np.stack(got).astype(int)
    assert len(frames["torch"]) == 2
    diff = int(np.abs(frames["onnxruntime"] - frames["torch"]).max())
    print(f"onnxruntime vs torch with GFPGAN: max {diff} levels")
    assert diff <= 2


def test_export_of_a_wrong_file_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """CodeFormer's file handed to `--model gfpgan`, and GFPGAN's paper model: one line, exit 2, no file."""
    cases = {
        "codeformer.pth": ({"ft_layers.0.self_attn.in_proj_weight": torch.zeros(3, 1)}, "a CodeFormer checkpoint"),
        "GFPGANv1.pth": ({"stylegan_decoder.style_conv1.activate.bias": torch.zeros(1)}, "the paper model"),
    }
    for file, (state_dict, words) in cases.items():
        torch.save({"params_ema": state_dict}, tmp_path / file)
        argv = ["--model", "gfpgan", "--checkpoint_path", str(tmp_path / file), "--out", str(tmp_path / "g.onnx")]
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda argv=argv: export_onnx.main(argv))
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and words in err, err
        assert "--checkpoint_path expects GFPGANv1Clean (GFPGANv1.4.pth)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cases)

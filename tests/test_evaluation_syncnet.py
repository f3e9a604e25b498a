"""syncnet_python's S: the state-dict layout of syncnet_v2.model, the forward goldens, the loader."""

import pytest
import torch

from common.errors import UserError
from evaluation.syncnet import S, copy_parameters, load_syncnet
from tools.detweights import assert_stats, det_state_dict, formula_input, load_golden, load_spec

GOLDEN = load_golden("syncnet_python")


@pytest.fixture(scope="module")
def model():
    m = S()
    copy_parameters(m, det_state_dict("syncnet_python_S"))
    return m.eval()


def test_state_dict_matches_spec():
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in S().state_dict().items()]
    assert got == [tuple(e) for e in load_spec("syncnet_python_S")]


@pytest.mark.parametrize("method", ["forward_aud", "forward_lip", "forward_lipfeat"])
def test_forward_golden(model, method):
    g = GOLDEN[method]
    with torch.no_grad():
        out = getattr(model, method)(formula_input(g["inputs"]["x"]))
    # atol scales with the output: forward_lip (std ~21) shows float32 round-off of the 3-D convolutions
    # up to ~1.2e-4 on near-zero elements on some CPUs (different oneDNN kernels from the golden machine).
    worst = assert_stats(out, g["output"], rtol=1e-4, atol=1e-5 * max(1.0, g["output"]["std"]))
    print(f"{method}: max |deviation| {worst:.3g}")


def test_loader_copies_and_keeps_missing_keys(tmp_path):
    sd = det_state_dict("syncnet_python_S")
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # a torch < 0.4.1 file
    path = tmp_path / "syncnet_v2.model"
    torch.save(sd, path)
    m = load_syncnet(path)
    assert not m.training
    own = m.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    assert int(own["netcnnaud.1.num_batches_tracked"]) == 0


def test_loader_errors_name_file_and_fix(tmp_path):
    with pytest.raises(UserError, match="missing.model.*download_model.sh"):
        load_syncnet(tmp_path / "missing.model")
    truncated = tmp_path / "truncated.model"
    torch.save(det_state_dict("syncnet_python_S"), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated.model"):
        load_syncnet(truncated)
    wrong = tmp_path / "wav2lip.pth"
    torch.save({"state_dict": {}, "global_step": 1}, wrong)
    with pytest.raises(UserError, match="wav2lip.pth: not a syncnet_python S state dict"):
        load_syncnet(wrong)
    shape = tmp_path / "shape.model"
    torch.save({"netfcaud.3.bias": torch.zeros(512)}, shape)
    with pytest.raises(UserError, match="netfcaud.3.bias has shape"):
        load_syncnet(shape)

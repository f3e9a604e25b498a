"""Our networks must be the original's: same state dicts, same outputs under the golden weights."""

import numpy as np
import pytest
import torch

import models
from tools.detweights import assert_stats, det_state_dict, formula_input, load_golden, load_spec

ARCHS = {
    "Wav2Lip": models.Wav2Lip,
    "SyncNet_color": models.SyncNet_color,
    "Wav2Lip_disc_qual": models.Wav2Lip_disc_qual,
}


def golden_model(arch: str) -> torch.nn.Module:
    model = ARCHS[arch]()
    model.load_state_dict(det_state_dict(arch))
    return model.eval()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_state_dict_equals_spec(arch):
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in ARCHS[arch]().state_dict().items()]
    assert got == [tuple(e) for e in load_spec(arch)]


@pytest.mark.parametrize("case", ["forward_4d", "forward_5d"])
@torch.no_grad()
def test_wav2lip_golden(case):
    g = load_golden("wav2lip")[case]
    out = golden_model("Wav2Lip")(
        formula_input(g["inputs"]["audio_sequences"]), formula_input(g["inputs"]["face_sequences"])
    )
    dev = assert_stats(out, g["output"])
    print(f"wav2lip {case} max |dev| {dev:.2e}")


@torch.no_grad()
def test_folded_batchnorm_keeps_the_golden_output():
    g = load_golden("wav2lip")["forward_4d"]
    model = models.conv.fold_batchnorm(golden_model("Wav2Lip"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any("running_mean" in k for k in model.state_dict())
    out = model(formula_input(g["inputs"]["audio_sequences"]), formula_input(g["inputs"]["face_sequences"]))
    dev = assert_stats(out, g["output"])
    print(f"wav2lip folded max |dev| {dev:.2e}")
    faces = torch.rand(2, 6, 96, 96, generator=torch.Generator().manual_seed(0))
    mels = torch.randn(2, 1, 80, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(mels, faces), golden_model("Wav2Lip")(mels, faces), rtol=0, atol=5e-6)


@torch.no_grad()
def test_fine_chunks_give_the_same_faces():
    model = golden_model("Wav2Lip")
    faces = torch.rand(7, 6, 96, 96, generator=torch.Generator().manual_seed(2))
    mels = torch.randn(7, 1, 80, 16, generator=torch.Generator().manual_seed(3))
    whole = model(mels, faces)
    for chunk in (1, 3, 7, 16):
        torch.testing.assert_close(model(mels, faces, fine_chunk=chunk), whole, rtol=0, atol=1e-6)
    assert not torch.equal(model(mels.flip(0), faces, fine_chunk=3), whole)  # chunks are not mixed up


@torch.no_grad()
def test_syncnet_color_golden():
    g = load_golden("syncnet_color")
    a, v = golden_model("SyncNet_color")(
        formula_input(g["inputs"]["audio_sequences"]), formula_input(g["inputs"]["face_sequences"])
    )
    for got, want in ((a, g["audio_embedding"]), (v, g["face_embedding"])):
        assert_stats(got, want)
        np.testing.assert_allclose(got.reshape(-1).numpy(), want["all"], rtol=1e-4, atol=1e-5)
    sim = torch.nn.functional.cosine_similarity(a, v)
    np.testing.assert_allclose(sim.numpy(), g["cosine_similarity"], rtol=1e-4, atol=1e-6)
    loss = models.cosine_loss(a, v, torch.ones(2, 1))
    assert float(loss) == pytest.approx(g["cosine_loss_y1"]["value"], rel=1e-5)


@torch.no_grad()
def test_disc_qual_golden():
    g = load_golden("disc_qual")
    disc = golden_model("Wav2Lip_disc_qual")
    faces = formula_input(g["inputs"]["face_sequences"])
    assert_stats(disc(faces), g["forward"]["output"])
    assert float(disc.perceptual_forward(faces)) == pytest.approx(g["perceptual_forward"]["output"], rel=1e-5)


def test_wav2lip_trains_in_5d():
    """A backward pass through the 5-D training path reaches every parameter (nothing detached)."""
    model = models.Wav2Lip()
    out = model(torch.randn(2, 5, 1, 80, 16), torch.rand(2, 6, 5, 96, 96))
    assert out.shape == (2, 3, 5, 96, 96)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())

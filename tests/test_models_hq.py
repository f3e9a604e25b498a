"""Wav2Lip-HQ's networks must be the reference ones: same keys and shapes, same outputs under the golden
weights, and the architecture of any released ESRGAN file read from its shapes."""

import pytest
import torch

import models
from models.bisenet import BiSeNet, bisenet_config
from models.rrdbnet import RRDBNet, rrdbnet_config
from tools.detweights import assert_stats, det_weights_like, formula_input, load_golden

SMALL = dict(num_feat=16, num_block=2, num_grow_ch=8)  # a tiny RRDBNet: the same keys, a fraction of the time


def golden_model(model: torch.nn.Module, arch: str, golden: dict) -> torch.nn.Module:
    """`model` with the deterministic weights, after checking their sum against the golden's (keys and shapes)."""
    weights = det_weights_like(model, arch)
    assert sum(float(t.double().sum()) for t in weights.values()) == pytest.approx(golden["state_dict_sum"], rel=1e-12)
    model.load_state_dict(weights)
    return model.eval()


@torch.no_grad()
def test_rrdbnet_golden():
    g = load_golden("esrgan")
    model = golden_model(RRDBNet(3, 3, num_feat=64, num_block=23, num_grow_ch=32), "RRDBNet", g)
    dev = assert_stats(model(formula_input(g["input"])), g["output"])
    print(f"rrdbnet max |dev| {dev:.2e}")


@torch.no_grad()
def test_bisenet_golden():
    g = load_golden("bisenet")
    model = golden_model(BiSeNet(n_classes=19), "BiSeNet", g)
    x = formula_input(g["input"])
    out, out16, out32 = model(x)
    devs = [assert_stats(got, g[name]) for got, name in ((out, "output"), (out16, "output16"), (out32, "output32"))]
    print(f"bisenet max |dev| {max(devs):.2e}")
    # the closest top-1/top-2 margin is ~1e-5, well above the ~1e-6 deviation: the counts are exact
    assert torch.bincount(out.argmax(1).flatten(), minlength=19).tolist() == g["argmax_class_counts"]
    assert torch.equal(model.parse(x), out)


@pytest.mark.parametrize("scale", [4, 2, 1])
@torch.no_grad()
def test_rrdbnet_config_rebuilds_any_scale(scale):
    saved = RRDBNet(scale=scale, **SMALL).eval()
    weights = saved.state_dict()
    assert weights["conv_first.weight"].shape[1] == 3 * {4: 1, 2: 4, 1: 16}[scale]
    config = rrdbnet_config(weights)
    assert config == dict(num_in_ch=3, num_out_ch=3, scale=scale, **SMALL)
    model = RRDBNet(**config).eval()
    model.load_state_dict(weights, strict=True)
    x = torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(scale))
    out = model(x)
    assert out.shape == (2, 3, 12 * scale, 16 * scale)
    torch.testing.assert_close(out, saved(x), rtol=0, atol=0)


@torch.no_grad()
def test_pixel_unshuffle_folds_blocks_as_basicsr():
    """Channel c·r² + i·r + j holds pixel (i, j) of each r×r block: the order RealESRGAN_x2plus was trained on."""
    model = RRDBNet(scale=1, **SMALL).eval()
    seen = {}
    model.conv_first.register_forward_pre_hook(lambda _, args: seen.update(x=args[0]))
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    model(x)
    r = 4
    for c in range(3):
        for i in range(r):
            for j in range(r):
                assert torch.equal(seen["x"][:, c * r * r + i * r + j], x[:, c, i::r, j::r])


@pytest.mark.parametrize(
    "make",
    [
        lambda: models.Wav2Lip().state_dict(),
        lambda: BiSeNet().state_dict(),
        lambda: {"params": RRDBNet(**SMALL).state_dict()},  # still in its container
        lambda: {k: v for k, v in RRDBNet(**SMALL).state_dict().items() if not k.startswith("conv_first")},
        lambda: {k: v for k, v in RRDBNet(**SMALL).state_dict().items() if not k.startswith("body.0.")},
        lambda: {**RRDBNet(**SMALL).state_dict(), "conv_first.weight": torch.zeros(16, 6, 3, 3)},
    ],
    ids=["wav2lip", "bisenet", "container", "no-conv_first", "block-gap", "bad-in-channels"],
)
def test_rrdbnet_config_rejects_other_files(make):
    with pytest.raises(ValueError, match="RRDBNet|BasicSR") as e:
        rrdbnet_config(make())
    assert "\n" not in str(e.value)


def test_bisenet_config():
    assert bisenet_config(BiSeNet(n_classes=19).state_dict()) == dict(n_classes=19)
    assert bisenet_config(BiSeNet(n_classes=5).state_dict()) == dict(n_classes=5)
    for wrong in (RRDBNet(**SMALL).state_dict(), models.Wav2Lip().state_dict()):
        with pytest.raises(ValueError, match="not a BiSeNet") as e:
            bisenet_config(wrong)
        assert "\n" not in str(e.value)
    mixed = {**BiSeNet(n_classes=19).state_dict(), "conv_out16.conv_out.weight": torch.zeros(5, 64, 1, 1)}
    with pytest.raises(ValueError, match="disagree"):
        bisenet_config(mixed)

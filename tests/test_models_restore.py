"""GFPGAN v1.4 and CodeFormer must be the reference networks: same state dicts, same outputs under the golden
weights, and checkpoints of any other architecture refused in one line."""

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from common.weights import ARCHS, check_fits, load_weights, skeleton, state_dict_of
from models import codeformer, gfpgan
from models.codeformer import CodeFormer
from models.gfpgan import GFPGANv1Clean
from tools.detweights import assert_stats, det_weights_like, formula_input, load_golden

GFPGAN_GOLDEN = load_golden("gfpgan")
CODEFORMER_GOLDEN = load_golden("codeformer")


def golden_model(model: torch.nn.Module, arch: str, total: float) -> torch.nn.Module:
    weights = det_weights_like(model, arch)
    model.load_state_dict(weights, strict=True)
    assert sum(float(t.double().sum()) for t in model.state_dict().values()) == pytest.approx(total, rel=1e-12)
    return model.eval()


@pytest.fixture(scope="module")
def gfpgan_model() -> GFPGANv1Clean:
    """GFPGANv1Clean with the golden weights, whose sum proves the keys and shapes."""
    return golden_model(GFPGANv1Clean(), "GFPGANv1Clean", GFPGAN_GOLDEN["state_dict_sum"])


@pytest.fixture(scope="module")
def codeformer_model() -> CodeFormer:
    """CodeFormer with the golden weights, whose sum proves the keys and shapes."""
    return golden_model(CodeFormer(), "CodeFormer", CODEFORMER_GOLDEN["state_dict_sum"])


@torch.no_grad()
def test_gfpgan_golden(gfpgan_model):
    g = GFPGAN_GOLDEN
    image, rgbs = gfpgan_model(formula_input(g["input"]), return_rgb=True)
    assert len(rgbs) == g["n_out_rgbs"]
    print(
        f"gfpgan max |dev| image {assert_stats(image, g['output']):.2e}, rgb {assert_stats(rgbs[-1], g['out_rgbs_last']):.2e}"
    )


@torch.no_grad()
def test_codeformer_golden_at_two_fidelities(codeformer_model):
    """w = 0.5 through forward (w a tensor, as the ONNX input); w = 0 from the same encoding (a number,
    which skips the fuse). The argmax over the logits nearly ties (margin 3e-4): the codes must be equal."""
    g = CODEFORMER_GOLDEN
    x = formula_input(g["input"])
    image, logits, lq_feat = codeformer_model(x, torch.tensor([0.5]))
    _, _, skips = codeformer_model.encode(x)  # the same numbers as in forward, recomputed for the w = 0 image
    image0 = codeformer_model.generate(lq_feat, logits, skips, 0.0)
    for w, img in (("0.5", image), ("0.0", image0)):
        want = g[f"w={w}"]
        dev = [
            assert_stats(img, want["output"]),
            assert_stats(logits, want["logits"]),
            assert_stats(lq_feat, want["lq_feat"]),
        ]
        assert logits.argmax(-1).reshape(-1).tolist() == want["code_indices"]
        print(f"codeformer w={w} max |dev| image, logits, lq_feat {', '.join(f'{d:.2e}' for d in dev)}")


def test_fuse_weight_is_branch_free_and_exact_at_zero():
    """The reference skips the fuse when w <= 0: a tensor w must give dec exactly there, even when the fuse
    itself overflows, and a per-sample w must act per sample."""
    torch.manual_seed(0)
    block = codeformer.Fuse_sft_block(32).eval()
    enc, dec = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        half = block(enc, dec, torch.tensor([0.5]))
        assert not torch.equal(half, dec)
        torch.testing.assert_close(block(enc, dec, torch.tensor([0.0, 0.5]).view(-1, 1, 1, 1))[1], half[1])
        block.scale[2].bias.fill_(float("inf"))  # a fuse that overflows, as fp16 can
        for w in (0.0, -0.3):
            assert torch.equal(block(enc, dec, torch.tensor([w])), dec)


# ---- checkpoints ----------------------------------------------------------------------------------------


def meta_state_dict(model_class) -> dict[str, torch.Tensor]:
    """The state dict of `model_class` without its memory: the checks read keys and shapes only."""
    return skeleton(model_class).state_dict()


def assert_refused(model_class, arch: str, bad: dict, reason: str) -> None:
    """`bad` given for `arch` is one line naming the file, the reason and the file to use."""
    with pytest.raises(UserError, match=reason) as err:
        check_fits(skeleton(model_class), bad, arch, "x.pth", "--enhancer_path")
    message = str(err.value)
    assert "\n" not in message and message.startswith("x.pth: ") and ARCHS[arch].files in message, message


# Keys of the original paper model (GFPGANv1.pth, `GFPGANv1` with channel_multiplier=1) that the clean
# architecture lacks, as the reference module lists them.
GFPGAN_V1_KEYS = {
    "conv_body_first.0.weight": (16, 3, 1, 1),
    "conv_body_first.1.bias": (16,),
    "conv_body_down.0.conv1.0.weight": (16, 16, 3, 3),
    "stylegan_decoder.style_conv1.activate.bias": (512,),
    "toRGB.6.weight": (3, 16, 1, 1),
}


def test_gfpgan_checkpoint_checks():
    sd = meta_state_dict(GFPGANv1Clean)
    check_fits(skeleton(GFPGANv1Clean), sd, "GFPGANv1Clean", "x.pth", "--enhancer_path")  # v1.2-v1.4's keys
    cases = {
        "this is a CodeFormer checkpoint": meta_state_dict(CodeFormer),
        "GFPGAN's original architecture \\(GFPGANv1.pth, the paper model": {k: torch.empty(s, device="meta") for k, s in GFPGAN_V1_KEYS.items()},
        "missing stylegan_decoder.noises.noise14;": {k: v for k, v in sd.items() if not k.endswith("noise14")},
        "wrong shape toRGB.6.weight \\[3, 16, 1, 1\\] \\(model \\[3, 32, 1, 1\\]\\)": {**sd, "toRGB.6.weight": torch.empty(3, 16, 1, 1, device="meta")},
        "this is a checkpoint of RestoreFormer": {"encoder.conv_in.weight": torch.zeros(1)},
        "this is a Wav2Lip checkpoint": {"face_decoder_blocks.0.0.conv_block.0.weight": torch.zeros(1)},
        "not a checkpoint of any model of this project": {"a.weight": torch.zeros(1)},
    }  # fmt: skip
    for reason, bad in cases.items():
        assert_refused(GFPGANv1Clean, "GFPGANv1Clean", bad, reason)


def test_codeformer_checkpoint_checks():
    sd = meta_state_dict(CodeFormer)
    check_fits(skeleton(CodeFormer), sd, "CodeFormer", "x.pth", "--enhancer_path")
    vqgan = {k: v for k, v in sd.items() if k.split(".")[0] in ("encoder", "quantize", "generator")}
    cases = {
        "this is a GFPGANv1Clean checkpoint": meta_state_dict(GFPGANv1Clean),
        "CodeFormer's stage I": vqgan,
        "missing fuse_convs_dict.256.": {k: v for k, v in sd.items() if not k.startswith("fuse_convs_dict.256.")},
        "wrong shape position_emb": {**sd, "position_emb": torch.empty(1024, 512, device="meta")},
    }
    for reason, bad in cases.items():
        assert_refused(CodeFormer, "CodeFormer", bad, reason)


def test_basicsr_containers():
    """`params_ema` first (the EMA weights, as GFPGAN's and CodeFormer's loaders take them), then `params`,
    then a raw state dict; anything else is one line."""
    sd, other = {"a.weight": torch.zeros(1)}, {"b.weight": torch.zeros(1)}
    assert state_dict_of({"params_ema": sd, "params": other}, "x.pth") == sd
    assert state_dict_of({"params": sd}, "x.pth") == sd
    assert state_dict_of(sd, "x.pth") == sd
    for bad in ({"params_ema": "junk"}, {}, [sd], None):
        with pytest.raises(UserError, match="x.pth: holds no state dict"):
            state_dict_of(bad, "x.pth")


def test_wrong_file_through_the_loader_is_one_line(tmp_path):
    """A CodeFormer file handed over for GFPGAN, in the released container, as a person would."""
    path = tmp_path / "codeformer.pth"
    torch.save({"params_ema": {"ft_layers.0.self_attn.in_proj_weight": torch.zeros(3, 1)}}, path)
    with pytest.raises(UserError) as err:
        load_weights(skeleton(GFPGANv1Clean), path, "GFPGANv1Clean", "--enhancer_path")
    assert str(err.value) == (
        f"{path}: this is a CodeFormer checkpoint; --enhancer_path expects GFPGANv1Clean (GFPGANv1.4.pth)"
    )


@torch.no_grad()
def test_modulated_conv_is_the_per_sample_weight_modulation():
    """Modulating activations instead of weights (for a dynamic batch) must give StyleGAN2's numbers: each
    sample convolved with its own style-scaled, demodulated weight, independently of its neighbours."""
    torch.manual_seed(0)
    for demodulate, upsample in ((True, True), (True, False), (False, False)):
        conv = gfpgan.ModulatedConv2d(8, 4, 3, demodulate=demodulate, upsample=upsample)
        x, latents = torch.randn(3, 8, 5, 5), torch.randn(3, gfpgan.STYLE_DIM)
        out = conv(x, latents)
        for b in range(3):
            weight = conv.weight * conv.modulation(latents[b])[None, :, None, None]
            if demodulate:
                weight = weight * torch.rsqrt(weight.square().sum((1, 2, 3), keepdim=True) + 1e-8)
            xb = gfpgan.resize(x[b : b + 1], 2) if upsample else x[b : b + 1]
            torch.testing.assert_close(out[b : b + 1], F.conv2d(xb, weight, padding=1), rtol=1e-5, atol=1e-6)


def test_modulated_weights_are_4d_inside_5d_in_the_state_dict():
    """Held 4-D so that `.to(memory_format=torch.channels_last)` works; 5-D in and out of the state dict."""
    conv = gfpgan.ModulatedConv2d(8, 4, 3).to(memory_format=torch.channels_last)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    sd = conv.state_dict()
    assert sd["weight"].shape == (1, 4, 8, 3, 3)
    other = gfpgan.ModulatedConv2d(8, 4, 3)
    other.load_state_dict(sd, strict=True)
    assert torch.equal(other.weight, conv.weight) and sd["weight"].shape == (1, 4, 8, 3, 3)  # the caller's dict kept

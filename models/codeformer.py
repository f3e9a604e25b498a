"""CodeFormer (Zhou et al., NeurIPS 2022): face restoration as code lookup in a learned discrete prior.

A VQGAN encoder turns the degraded 512×512 face into a 16×16 grid of 256-d features. A transformer reads
the grid and predicts, for each of the 256 cells, which of 1024 codebook entries a high-quality face
would use there; the chosen entries (restyled to the input's feature statistics, AdaIN) go through the
VQGAN generator. The controllable feature transform adds the encoder's features back into the generator
at 32…256 px, weighted by `w`: 0 trusts the prior alone (quality), 1 the input (fidelity).

State-dict keys are those of sczhou's `CodeFormer`, so the released `codeformer.pth` loads strictly
(`{"params_ema": sd}`, which `common.weights` unwraps); the attention keeps nn.MultiheadAttention's
parameter names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NF = 64  # VQGAN base width
CH_MULT = (1, 2, 2, 4, 4, 8)  # width multiplier per resolution 512, 256, …, 16
WIDTH = {512 >> i: NF * mult for i, mult in enumerate(CH_MULT)}  # channels per resolution: 512 px → 64 … 16 px → 512
EMB_DIM = 256  # width of a codebook entry and of the encoder's output
CODEBOOK_SIZE = 1024
GRID = 16  # the 512 px face is 16×16 codes (5 halvings)
DIM, HEADS, LAYERS = 512, 8, 9  # the code-prediction transformer
CONNECT = (32, 64, 128, 256)  # resolutions where encoder features are fused into the generator
# Where a resolution's features are taken (after its second residual block) and fused (after its first),
# as indices into encoder.blocks / generator.blocks: the reference's fuse_*_block tables.
ENCODER_TAP = {512: 2, 256: 5, 128: 8, 64: 11, 32: 14, 16: 18}
GENERATOR_TAP = {16: 6, 32: 9, 64: 12, 128: 15, 256: 18, 512: 21}


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, exported to ONNX as means of per-channel means.

    The exporter's own form (InstanceNormalization over each group) runs in ONNX Runtime with float32
    sums over whole groups: on a 512×512 map it is off by 3e-4 where torch is off by 6e-7 (both against
    float64), and the network grows that to 1e-3 at the output. Averaging each channel's pixels first,
    then the group's channels, brings ONNX Runtime to 6e-6. Torch keeps its native kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return super().forward(x)
        xg = x.unflatten(1, (self.num_groups, -1))  # (N, groups, channels per group, H, W)
        d = xg - xg.mean((3, 4), keepdim=True).mean(2, keepdim=True)
        var = d.square().mean((3, 4), keepdim=True).mean(2, keepdim=True)
        y = (d * torch.rsqrt(var + self.eps)).flatten(1, 2)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


def normalize(c: int) -> GroupNorm:
    return GroupNorm(32, c, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm → swish → conv, twice, plus a 1×1 projection of the input when the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = normalize(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = normalize(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.conv_out = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + (x if self.conv_out is None else self.conv_out(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a 16×16 map, with a residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape_as(x)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding right and bottom only (the VQGAN convention)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Blocks(nn.Module):
    """A plain list of layers, run by CodeFormer itself (it taps features between them)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


def vq_encoder() -> Blocks:
    """512×512 RGB → 16×16×256: two residual blocks per resolution, attention at 16×16."""
    blocks: list[nn.Module] = [nn.Conv2d(3, NF, 3, 1, 1)]
    cin = NF
    for i, mult in enumerate(CH_MULT):
        for _ in range(2):
            blocks.append(ResBlock(cin, NF * mult))
            cin = NF * mult
            if i == len(CH_MULT) - 1:
                blocks.append(AttnBlock(cin))
        if i != len(CH_MULT) - 1:
            blocks.append(Downsample(cin))
    blocks += [ResBlock(cin, cin), AttnBlock(cin), ResBlock(cin, cin), normalize(cin), nn.Conv2d(cin, EMB_DIM, 3, 1, 1)]
    return Blocks(blocks)


def vq_generator() -> Blocks:
    """16×16×256 codes → 512×512 RGB, the encoder's mirror."""
    cin = NF * CH_MULT[-1]
    blocks: list[nn.Module] = [nn.Conv2d(EMB_DIM, cin, 3, 1, 1), ResBlock(cin, cin), AttnBlock(cin), ResBlock(cin, cin)]
    for i in reversed(range(len(CH_MULT))):
        for _ in range(2):
            blocks.append(ResBlock(cin, NF * CH_MULT[i]))
            cin = NF * CH_MULT[i]
            if i == len(CH_MULT) - 1:
                blocks.append(AttnBlock(cin))
        if i != 0:
            blocks.append(Upsample(cin))
    blocks += [normalize(cin), nn.Conv2d(cin, 3, 3, 1, 1)]
    return Blocks(blocks)


class Codebook(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(CODEBOOK_SIZE, EMB_DIM)


class SelfAttention(nn.Module):
    """Multi-head self-attention, batch first, with nn.MultiheadAttention's parameter names."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.heads = heads
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Queries and keys from `qk` (features + position), values from `v`; (B, L, dim) each."""
        dim = v.shape[-1]
        q, k = F.linear(qk, self.in_proj_weight[: 2 * dim], self.in_proj_bias[: 2 * dim]).chunk(2, dim=-1)
        v = F.linear(v, self.in_proj_weight[2 * dim :], self.in_proj_bias[2 * dim :])
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class TransformerSALayer(nn.Module):
    """Pre-norm transformer layer; the position embedding is added to queries and keys only."""

    def __init__(self):
        super().__init__()
        self.self_attn = SelfAttention(DIM, HEADS)
        self.linear1, self.linear2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h + pos, h)
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class Fuse_sft_block(nn.Module):
    """Controllable feature transform: scale and shift maps from encoder and generator features."""

    def __init__(self, c: int):
        super().__init__()
        self.encode_enc = ResBlock(2 * c, c)
        self.scale = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 3, 1, 1))
        self.shift = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 3, 1, 1))

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """dec + w·(dec·scale + shift) where w > 0; dec itself, exactly, elsewhere (as the reference's `if
        w > 0`, without branching on a tensor: `where` also keeps an overflowed fp16 fuse out at w = 0)."""
        h = self.encode_enc(torch.cat([enc, dec], dim=1))
        return torch.where(w > 0, dec + w * (dec * self.scale(h) + self.shift(h)), dec)


def adaptive_instance_norm(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give `content` the per-channel mean and std (unbiased, + eps under the root) of `style`."""
    c_var, c_mean = torch.var_mean(content, dim=(2, 3), keepdim=True)
    s_var, s_mean = torch.var_mean(style, dim=(2, 3), keepdim=True)
    return (content - c_mean) / (c_var + eps).sqrt() * (s_var + eps).sqrt() + s_mean


class CodeFormer(nn.Module):
    """CodeFormer at 512 px: faces in RGB, [-1, 1], (N, 3, 512, 512) → restored faces, same range.

    The released model's arguments are fixed: dim_embd=512, n_head=8, n_layers=9, codebook_size=1024,
    connect_list=['32', '64', '128', '256'].
    """

    def __init__(self):
        super().__init__()
        self.position_emb = nn.Parameter(torch.zeros(GRID * GRID, DIM))
        self.encoder = vq_encoder()
        self.quantize = Codebook()
        self.generator = vq_generator()
        self.feat_emb = nn.Linear(EMB_DIM, DIM)
        self.ft_layers = nn.Sequential(*(TransformerSALayer() for _ in range(LAYERS)))
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, CODEBOOK_SIZE, bias=False))
        self.fuse_convs_dict = nn.ModuleDict({str(r): Fuse_sft_block(WIDTH[r]) for r in CONNECT})

    def forward(
        self, x: torch.Tensor, w: float | torch.Tensor, adain: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, logits (N, 256, 1024), lq_feat (N, 256, 16, 16)), as the reference's `forward(x, w,
        adain=adain)`. `w` is a number, or a tensor of shape [1] or [N] (the ONNX input)."""
        lq_feat, logits, skips = self.encode(x)
        return self.generate(lq_feat, logits, skips, w, adain), logits, lq_feat

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """The encoder's 16×16 features, the transformer's code logits, and the encoder features at the
        CONNECT resolutions that the generator fuses: everything that does not depend on `w`."""
        taps = {ENCODER_TAP[r]: r for r in CONNECT}
        skips = {}
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in taps:
                skips[taps[i]] = x
        tokens = self.feat_emb(x.flatten(2).transpose(1, 2))  # (N, 256 cells, DIM)
        for layer in self.ft_layers:
            tokens = layer(tokens, self.position_emb)
        return x, self.idx_pred_layer(tokens), skips

    def generate(
        self,
        lq_feat: torch.Tensor,
        logits: torch.Tensor,
        skips: dict[int, torch.Tensor],
        w: float | torch.Tensor,
        adain: bool = True,
    ) -> torch.Tensor:
        """The most likely code of each cell (the reference's top-1 of the softmax) through the generator,
        with the encoder's features fused in by `w`.

        A number w <= 0 skips the fuse blocks (27 % of the FLOPs), as the reference's `if w > 0` does; a
        tensor w never branches, so that a traced or exported graph serves every w, and `where` keeps
        exactly the unfused features where w <= 0.
        """
        codes = self.quantize.embedding(logits.argmax(-1))  # (N, 256 cells, EMB_DIM)
        # The transposed codes are laid out channels-last; the generator runs in the input's layout, as
        # the reference's .contiguous() does (torch's CPU GroupNorm is less exact on channels-last maps).
        layout = torch.channels_last if lq_feat.is_contiguous(memory_format=torch.channels_last) else None
        x = codes.transpose(1, 2).reshape_as(lq_feat).contiguous(memory_format=layout or torch.contiguous_format)
        if adain:
            x = adaptive_instance_norm(x, lq_feat)
        x = x.to(self.generator.blocks[0].weight.dtype)  # the generator may run in a lower precision (bf16)

        fuse = torch.is_tensor(w) or w > 0
        w = (w if torch.is_tensor(w) else torch.tensor(float(w))).to(x).reshape(-1, 1, 1, 1)
        fuse_at = {GENERATOR_TAP[r]: r for r in CONNECT} if fuse else {}
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if i in fuse_at:
                r = fuse_at[i]
                x = self.fuse_convs_dict[str(r)](skips[r].to(x.dtype), x, w)
        return x

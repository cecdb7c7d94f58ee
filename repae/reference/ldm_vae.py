"""The reference KL autoencoder in the CompVis latent-diffusion layout (REPAE-1.1 to REPAE-1.4).

Training never runs this module: the REPA-E stage trains diffusers `AutoencoderKL` models
(`repae.vae`). It exists so the LDM <-> diffusers converter (`repae.reference.convert`) can be checked
*numerically* and not only by key names: a randomly initialised model built here, converted, must
give the same moments and reconstructions as the diffusers model it was converted into. Its
state-dict keys are exactly the reference checkpoint keys (REPAE-1.4 in docs/reference-facts.md),
so a reference `.pt` loads into it with `strict=True`.

Layout facts that matter for the keys and the numerics:

* attention placement is decided from the *nominal* resolution of each level
  (`resolution // 2**level in attn_resolutions`), never from the runtime input size;
* the decoder's `up` list is indexed by resolution level (`up.0` is full resolution) although it
  is built from the lowest resolution upward;
* the encoder emits `2 * z_channels` channels (mean and log-variance stacked), and `quant_conv` /
  `post_quant_conv` are 1x1 convolutions on `2E` / `E` channels with `E = z_channels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LDM_ARCHS: dict[str, dict] = {
    "f8d4": dict(ch_mult=(1, 2, 4, 4), z_channels=4),
    "f16d32": dict(ch_mult=(1, 1, 2, 2, 4), z_channels=32),
}
"""Reference factory names (`vae_models[...]`); everything else takes the constructor defaults."""

GROUPS = 32
EPS = 1e-6


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=EPS, affine=True)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv3x3 twice, plus a residual; a 1x1 `nin_shortcut` only when widths differ."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0.0 in every reference config
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, 1x1-conv projections, residual add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(conv: nn.Conv2d) -> torch.Tensor:  # (B, 1, h*w, C): one head of width C
            return conv(y).flatten(2).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v), scale=c**-0.5)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad one pixel right/bottom, then a stride-2 3x3 conv without padding (halves h, w)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnets (`block.j`), optional attention after each (`attn.j`)."""

    def __init__(self, channels: list[int], attention: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(channels[:-1], channels[1:]))
        self.attn = nn.ModuleList(AttnBlock(channels[-1]) for _ in self.block) if attention else nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        return x


class MidBlock(nn.Module):
    """Resnet, attention, resnet at the lowest resolution (keys `block_1`, `attn_1`, `block_2`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B,3,H,W) -> moments (B, 2*z_channels, H/f, W/f) before `quant_conv`."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        z_channels: int,
        attn_resolutions: tuple[int, ...],
        resolution: int,
        num_res_blocks: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        widths = [ch * m for m in (1, *ch_mult)]
        self.down = nn.ModuleList()
        size = resolution
        for i in range(len(ch_mult)):
            level = Level([widths[i]] + [widths[i + 1]] * num_res_blocks, attention=size in attn_resolutions)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(widths[i + 1])
                size //= 2
            self.down.append(level)
        self.mid = MidBlock(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B,3,H,W), unbounded."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        z_channels: int,
        attn_resolutions: tuple[int, ...],
        resolution: int,
        num_res_blocks: int,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        levels = len(ch_mult)
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = MidBlock(width)
        up: list[Level] = []
        size = resolution // 2 ** (levels - 1)
        for i in reversed(range(levels)):  # built bottom-up, stored by level index
            out = ch * ch_mult[i]
            level = Level([width] + [out] * (num_res_blocks + 1), attention=size in attn_resolutions)
            width = out
            if i != 0:
                level.upsample = Upsample(width)
                size *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LDMAutoencoderKL(nn.Module):
    """Encoder + decoder + the two 1x1 quant convs, with reference (LDM) state-dict keys.

    `encode` returns the raw moments (mean and unclamped log-variance stacked on channels); the
    posterior itself lives in `repae.vae.Posterior`, shared with the diffusers path.
    """

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 4, 4),
        z_channels: int = 4,
        attn_resolutions: tuple[int, ...] = (16,),
        resolution: int = 256,
        num_res_blocks: int = 2,
    ) -> None:
        super().__init__()
        shape = dict(
            ch=ch,
            ch_mult=tuple(ch_mult),
            z_channels=z_channels,
            attn_resolutions=tuple(attn_resolutions),
            resolution=resolution,
            num_res_blocks=num_res_blocks,
        )
        self.config = shape
        self.encoder = Encoder(**shape)
        self.decoder = Decoder(**shape)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> moments (B, 2E, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B,E,h,w) -> (B,3,H,W), unclamped."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(moments, reconstruction of the posterior mean): deterministic, for comparisons."""
        moments = self.encode(x)
        return moments, self.decode(moments.chunk(2, dim=1)[0])


def build_ldm_vae(arch: str) -> LDMAutoencoderKL:
    """The reference model for a factory name ("f8d4" or "f16d32")."""
    if arch not in LDM_ARCHS:
        raise ValueError(f"unknown reference VAE arch {arch!r}; known: {sorted(LDM_ARCHS)}")
    return LDMAutoencoderKL(**LDM_ARCHS[arch])

"""2D/3D U-Nets, optionally conditioned on a diffusion timestep (`model.arch`).

- `monai` (the default): MONAI's UNet with one convolution per level and a strided first convolution, so
  that nothing but the last transposed convolution runs at full resolution (4-5x faster per pixel on CPU
  than `double-conv`, at the Dice of the plain 2D recipe).
- `double-conv`: two 3x3 convolutions per level, the stem and the last decoder block at full resolution
  (the earlier default; runs made before `model.arch` existed keep it).
- `ssl4mis`: the 2D U-Net of SSL4MIS's scripts (and BCP's ACDC code), layer for layer: two conv-norm-LeakyReLU
  per level with the level's dropout between them, max-pooling down, 1x1 convolution + bilinear upsampling up,
  a 3x3 output convolution. A segmentation net only (no time embedding); the `la2d-ssl4mis` protocol trains it
  to compare the baselines with their originals without the protocol's own network.

The diffusion teacher of the reference is a plain U-Net whose sinusoidal time embedding is added
once, after the stem ("stem"); "blocks" (double-conv only) adds a projection of it in every block
instead, as diffusion U-Nets usually do. Per-block attention and heavy ResNet stacks are left out on
purpose: on CPU they cost 20-50x more per image for this task.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import UNet as _MonaiBody
from torch import Tensor, nn

ARCHS = ("monai", "double-conv", "ssl4mis")


def conv(dims: int, *args, **kwargs) -> nn.Module:
    return (nn.Conv2d if dims == 2 else nn.Conv3d)(*args, **kwargs)


def norm_layer(dims: int, kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r} (batch, instance, group)")


def conv_norm_act(dims: int, cin: int, cout: int, norm: str) -> nn.Sequential:
    """3x3 convolution, norm, LeakyReLU(0.01): the layer both double-convolution U-Nets are made of."""
    return nn.Sequential(conv(dims, cin, cout, 3, padding=1), norm_layer(dims, norm, cout),
                         nn.LeakyReLU(0.01, inplace=True))


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Transformer-style embedding of integer timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class ConvBlock(nn.Module):
    """Two conv-norm-LeakyReLU layers; a time embedding, when given, is added between them."""

    def __init__(self, dims: int, cin: int, cout: int, norm: str, time_dim: int | None = None):
        super().__init__()
        self.conv1 = conv_norm_act(dims, cin, cout, norm)
        self.conv2 = conv_norm_act(dims, cout, cout, norm)
        self.time = nn.Linear(time_dim, cout) if time_dim else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        x = self.conv1(x)
        if self.time is not None and temb is not None:
            x = x + self.time(temb).view(*temb.shape[:1], -1, *([1] * (x.ndim - 2)))
        return self.conv2(x)


class UNet(nn.Module):
    """U-Net with `len(channels)` levels: strided-conv down, transposed-conv up, concatenated skips.

    time_embedding: None (a segmentation net), "stem" (added once after the stem) or "blocks".
    """

    def __init__(self, *, dims: int, in_channels: int, out_channels: int,
                 channels: tuple[int, ...] | list[int] = (16, 32, 64, 128), norm: str = "batch",
                 time_embedding: str | None = None):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if time_embedding not in (None, "stem", "blocks"):
            raise ValueError(f"unknown time_embedding {time_embedding!r} (stem, blocks)")
        self.dims, self.time_mode, ch = dims, time_embedding, list(channels)
        tdim = ch[0] * 4 if time_embedding else None
        self.time_mlp = (nn.Sequential(nn.Linear(ch[0], tdim), nn.SiLU(), nn.Linear(tdim, tdim))
                         if tdim else None)
        block_tdim = tdim if time_embedding == "blocks" else None
        self.stem = ConvBlock(dims, in_channels, ch[0], norm, tdim)
        self.down = nn.ModuleList(conv(dims, a, a, 2, stride=2) for a in ch[:-1])
        self.encoders = nn.ModuleList(ConvBlock(dims, a, b, norm, block_tdim) for a, b in zip(ch, ch[1:]))
        up = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.up = nn.ModuleList(up(b, a, 2, stride=2) for a, b in zip(ch, ch[1:]))
        self.decoders = nn.ModuleList(ConvBlock(dims, 2 * a, a, norm, block_tdim) for a in ch[:-1])
        self.head = conv(dims, ch[0], out_channels, 1)

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** (len(self.encoders))

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        temb = None
        if self.time_mlp is not None:
            if t is None:
                raise ValueError("this U-Net is time-conditioned: pass the timesteps t")
            temb = self.time_mlp(sinusoidal_embedding(t, self.stem.conv1[0].out_channels))
        h = self.stem(x, temb)
        skips = []
        for down, enc in zip(self.down, self.encoders):
            skips.append(h)
            h = enc(down(h), temb)
        for up, dec in zip(reversed(self.up), reversed(self.decoders)):
            h = dec(torch.cat([up(h), skips.pop()], dim=1), temb)
        return self.head(h)


class MonaiUNet(nn.Module):
    """MONAI's UNet (strides 2, no residual units), with an optional time embedding added once after its first
    (strided) convolution: the `stem` conditioning of the reference. Scriptable as it is (export)."""

    __jit_unused_properties__ = ["divisor"]

    def __init__(self, *, dims: int, in_channels: int, out_channels: int,
                 channels: tuple[int, ...] | list[int] = (16, 32, 64, 128), norm: str = "batch",
                 time_embedding: str | None = None, dropout: float | list[float] = 0.0):
        """dropout: one rate for every convolution (MONAI's), or one per encoder level, shallowest first, and none
        in the decoder (SSL4MIS's 2D U-Net, [0.05, 0.1, 0.2, 0.3, 0.5], the semi-supervised baselines' net)."""
        super().__init__()
        if time_embedding not in (None, "stem"):
            raise ValueError(f"model.arch monai conditions on time at the stem only, not {time_embedding!r}")
        ch = [int(c) for c in channels]
        norms = {"batch": "batch", "instance": ("instance", {"affine": True}),
                 "group": ("group", {"num_groups": min(8, ch[0])})}
        if norm not in norms:
            raise ValueError(f"unknown norm {norm!r} (batch, instance, group)")
        per_level = isinstance(dropout, list | tuple)
        if per_level and len(dropout) != len(ch):
            raise ValueError(f"model.dropout: {list(dropout)} needs one rate per level ({len(ch)})")
        body = _MonaiBody(spatial_dims=dims, in_channels=in_channels, out_channels=out_channels, channels=ch,
                          strides=[2] * (len(ch) - 1), num_res_units=0, norm=norms[norm],
                          dropout=0.0 if per_level else float(dropout))
        if per_level:  # MONAI builds a Dropout into every convolution: the encoder's are the non-transposed ones
            transposed = nn.ConvTranspose2d | nn.ConvTranspose3d
            encoder = [m.adn.D for m in body.modules()
                       if isinstance(m, Convolution) and not isinstance(m.conv, transposed)]
            for drop, p in zip(encoder, dropout, strict=True):
                drop.p = float(p)
        # the body's three parts: first strided conv, everything below it (with the skip), last transposed conv
        self.first, self.inner, self.last = body.model[0], body.model[1], body.model[2]
        self.dims, self.emb_dim, self.depth = dims, ch[0], len(ch) - 1
        self.time_mlp = (nn.Sequential(nn.Linear(ch[0], 4 * ch[0]), nn.SiLU(), nn.Linear(4 * ch[0], ch[0]))
                         if time_embedding else None)

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** self.depth

    def forward(self, x: Tensor, t: Optional[Tensor] = None) -> Tensor:  # noqa: UP045 - TorchScript's spelling
        h = self.first(x)
        if self.time_mlp is not None:
            if t is None:
                raise ValueError("this U-Net is time-conditioned: pass the timesteps t")
            temb = self.time_mlp(sinusoidal_embedding(t, self.emb_dim))
            h = h + temb.reshape([temb.shape[0], temb.shape[1]] + [1] * (h.dim() - 2))
        return self.last(self.inner(h))

    @torch.jit.unused
    def encode(self, x: Tensor) -> list[Tensor]:
        """The encoder's features, shallowest first, the bottom last (a segmentation net: no time input); decode
        gives back forward(x). Why: UniMatch perturbs them (dropout) and decodes them a second time."""
        if self.time_mlp is not None:
            raise ValueError("encode: a time-conditioned U-Net needs its timesteps (use forward)")
        features, node = [self.first(x)], self.inner
        while not isinstance(node.submodule, Convolution):  # MONAI's level: (down, SkipConnection(deeper), up)
            features.append(node.submodule[0](features[-1]))
            node = node.submodule[1]
        return [*features, node.submodule(features[-1])]

    @torch.jit.unused
    def decode(self, features: list[Tensor]) -> Tensor:
        """Logits from encode's features: each level's up-convolution on [its feature, the deeper output]."""
        ups, node = [self.last], self.inner
        while not isinstance(node.submodule, Convolution):
            ups.append(node.submodule[2])
            node = node.submodule[1]
        out = features[-1]
        for feature, up in zip(reversed(features[:-1]), reversed(ups), strict=True):
            out = up(torch.cat([feature, out], dim=1))
        return out


class _SSL4MISConvBlock(nn.Sequential):
    """SSL4MIS's ConvBlock: conv-norm-LeakyReLU, dropout, conv-norm-LeakyReLU."""

    def __init__(self, dims: int, cin: int, cout: int, norm: str, dropout: float):
        super().__init__(*conv_norm_act(dims, cin, cout, norm), nn.Dropout(dropout),
                         *conv_norm_act(dims, cout, cout, norm))


class _SSL4MISUp(nn.Module):
    """SSL4MIS's bilinear UpBlock: 1x1 convolution to the skip's width, upsampling, [skip, up], ConvBlock."""

    def __init__(self, dims: int, cin: int, cskip: int, norm: str):
        super().__init__()
        self.reduce = conv(dims, cin, cskip, 1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear" if dims == 2 else "trilinear", align_corners=True)
        self.block = _SSL4MISConvBlock(dims, 2 * cskip, cskip, norm, 0.0)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.block(torch.cat([skip, self.up(self.reduce(x))], dim=1))


class SSL4MISUNet(nn.Module):
    """SSL4MIS's U-Net (code/networks/unet.py, `UNet`): dropout per encoder level (theirs 0.05, 0.1, 0.2, 0.3,
    0.5), none in the decoder. Scriptable as it is (export)."""

    __jit_unused_properties__ = ["divisor"]

    def __init__(self, *, dims: int, in_channels: int, out_channels: int,
                 channels: tuple[int, ...] | list[int] = (16, 32, 64, 128, 256), norm: str = "batch",
                 dropout: float | list[float] = 0.0):
        super().__init__()
        ch = [int(c) for c in channels]
        rates = [float(p) for p in dropout] if isinstance(dropout, list | tuple) else [float(dropout)] * len(ch)
        if len(rates) != len(ch):
            raise ValueError(f"model.dropout: {rates} needs one rate per level ({len(ch)})")
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        self.encoder = nn.ModuleList(
            nn.Sequential(*([pool(2)] if i else []), _SSL4MISConvBlock(dims, cin, cout, norm, p))
            for i, (cin, cout, p) in enumerate(zip([in_channels] + ch[:-1], ch, rates)))
        self.decoder = nn.ModuleList(_SSL4MISUp(dims, cin, cskip, norm) for cin, cskip in zip(ch[:0:-1], ch[-2::-1]))
        self.head = conv(dims, ch[0], out_channels, 3, padding=1)
        self.time_mlp = None  # a segmentation net: no time embedding
        self.depth = len(ch) - 1

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** self.depth

    def forward(self, x: Tensor) -> Tensor:
        skips: list[Tensor] = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        x = skips.pop()
        for level in self.decoder:
            x = level(x, skips.pop())
        return self.head(x)

    @torch.jit.unused
    def encode(self, x: Tensor) -> list[Tensor]:
        """The encoder's features, shallowest first (UniMatch's `encoder`)."""
        features = []
        for level in self.encoder:
            x = level(x)
            features.append(x)
        return features

    @torch.jit.unused
    def decode(self, features: list[Tensor]) -> Tensor:
        """Logits from encode's features (UniMatch's `decoder`)."""
        x = features[-1]
        for level, skip in zip(self.decoder, reversed(features[:-1]), strict=True):
            x = level(x, skip)
        return self.head(x)


SegNet = UNet | MonaiUNet | SSL4MISUNet
NETS = (UNet, MonaiUNet, SSL4MISUNet)


def build_unet(model_cfg: dict, *, dims: int, in_channels: int, out_channels: int,
               time_embedding: str | None = None) -> nn.Module:
    """The `model` config's network: `arch` monai (default), double-conv or ssl4mis."""
    arch = model_cfg["arch"]
    common = dict(dims=dims, in_channels=in_channels, out_channels=out_channels, channels=model_cfg["channels"],
                  norm=model_cfg["norm"], time_embedding=time_embedding)
    if arch == "monai":
        return MonaiUNet(dropout=model_cfg["dropout"], **common)
    if arch == "double-conv":
        return UNet(**common)
    if arch == "ssl4mis":
        if time_embedding is not None:
            raise ValueError("model.arch ssl4mis is a segmentation U-Net: it takes no diffusion timestep (use monai)")
        return SSL4MISUNet(dropout=model_cfg["dropout"], **{k: v for k, v in common.items() if k != "time_embedding"})
    raise ValueError(f"model.arch: unknown {arch!r} ({', '.join(ARCHS)})")

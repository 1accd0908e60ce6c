"""The mcLDM denoiser: a UNet over VAE latents that predicts the noise ε from (x_t, t, masked condition embedding).

Structure: stem conv → down levels → middle (ResBlock, self-attention, ResBlock) → up levels → GroupNorm-act-conv
(zero-initialised, so the untrained model predicts ε = 0).
Each level of the down path is [condition injection, `blocks_per_level` × (ResBlock [+ self-attention]), stride-2
conv (not at the last level)] and stores one skip (its features before the downsampling), at every level including
level 0. Each level of the up path concatenates its skip, injects the condition, runs its blocks and upsamples
(nearest + conv, not at level 0).

Conditioning as in mcLDM: no cross-attention. The condition embedding vector (`ConditionEmbedding.out_dim` wide) is
mapped once per forward pass by one shared Linear + LayerNorm to `condition_channels`, broadcast over H×W and
concatenated to the features at the entry of every level (down, middle, up); a conv3x3 per injection site maps the
concatenation back to the level's width. The time step enters every ResBlock as a projected sinusoidal embedding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from modules.layers import SelfAttention, group_norm
from modules.mcvae import ACTIVATIONS


@dataclass
class UNetConfig:
    start_channels: int = 64  # width of level 0; level i has start_channels · channel_mult[i]
    # one entry per level, levels = its length; [1, 3, 6, 8] (widths 64, 192, 384, 512) puts the paper's biked
    # config (these defaults, 4 latent channels, 8 conditions × 5) at 114.5 M parameters (paper: about 116 M)
    channel_mult: list[int] = field(default_factory=lambda: [1, 3, 6, 8])
    blocks_per_level: int = 4  # ResBlocks per level on the down path and on the up path
    # self-attention after each ResBlock of these levels; the middle block always has one
    attention_levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    attention_heads: int = 8
    attention_head_dim: int = 64
    condition_channels: int = 10  # the mapped condition embedding concatenated at every level
    time_embedding_dim: int = 128  # MLP output added in every ResBlock
    positional_dim: int = 64  # sinusoidal features of t fed to that MLP
    activation: Literal["selu", "relu", "gelu", "silu", "tanh", "elu"] = "selu"
    dropout: float = 0.05  # in the ResBlocks and the attention weights (training only)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of `module` (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def sinusoidal_frequencies(dim: int, *, device=None) -> torch.Tensor:
    """The dim // 2 frequencies 10000^(-i / (dim // 2)) of `sinusoidal_embedding` (float32)."""
    half = dim // 2
    return torch.exp(torch.arange(half, device=device, dtype=torch.float32) * (-math.log(10000.0) / max(half, 1)))


def sinusoidal_embedding(t: torch.Tensor, dim: int, frequencies: torch.Tensor | None = None) -> torch.Tensor:
    """Sinusoidal features [sin(t·f), cos(t·f)] of t (Vaswani et al. 2017, Sec. 3.5; Ho et al. 2020, Sec. 4)."""
    if frequencies is None:
        frequencies = sinusoidal_frequencies(dim, device=t.device)
    angles = t.float()[:, None] * frequencies[None, :]
    features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        features = nn.functional.pad(features, (0, 1))
    return features


class TimeEmbedding(nn.Module):
    """t (B,) → sinusoidal features → Linear-act-Linear → (B, time_embedding_dim)."""

    def __init__(self, positional_dim: int, embedding_dim: int, activation: type[nn.Module]):
        super().__init__()
        self.positional_dim = positional_dim
        self.register_buffer("frequencies", sinusoidal_frequencies(positional_dim), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(positional_dim, embedding_dim), activation(),
                                 nn.Linear(embedding_dim, embedding_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.positional_dim, self.frequencies))


class ResBlock(nn.Module):
    """x + conv(dropout(act(norm(conv(act(norm(x))) + proj(t))))) (He et al. 2016; Ho et al. 2020), 1×1 skip when
    the channel count changes; the last conv starts at zero, so every block starts as the identity."""

    def __init__(self, channels_in: int, channels_out: int, *, time_dim: int, activation: type[nn.Module],
                 dropout: float):
        super().__init__()
        self.inner = nn.Sequential(group_norm(channels_in), activation(),
                                   nn.Conv2d(channels_in, channels_out, 3, padding=1))
        self.time = nn.Sequential(activation(), nn.Linear(time_dim, channels_out))
        self.outer = nn.Sequential(group_norm(channels_out), activation(), nn.Dropout(dropout),
                                   nn.Conv2d(channels_out, channels_out, 3, padding=1))
        nn.init.zeros_(self.outer[-1].weight)
        nn.init.zeros_(self.outer[-1].bias)
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        h = h + self.time(time)[:, :, None, None].to(h.dtype)
        return self.skip(x) + self.outer(h)


def _with_condition(features: list[torch.Tensor], condition: torch.Tensor) -> torch.Tensor:
    """The features concatenated along the channels with the condition (B, K) broadcast over H×W, in the features'
    dtype and memory format (so the concatenation stays channels_last under autocast)."""
    first = features[0]
    fmt = torch.channels_last if first.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    c = condition.to(first.dtype)[:, :, None, None].expand(-1, -1, *first.shape[2:]).contiguous(memory_format=fmt)
    return torch.cat([*features, c], dim=1)


class DownLevel(nn.Module):
    """Condition injection (concat + conv3x3 to the level's width), blocks; returns (skip, downsampled or skip)."""

    def __init__(self, channels_in: int, width: int, cfg: UNetConfig, *, attention: bool, downsample: bool):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        self.inject = nn.Conv2d(channels_in + cfg.condition_channels, width, 3, padding=1)
        self.blocks = _blocks(width, cfg, act, attention)
        self.downsample = nn.Conv2d(width, width, 3, stride=2, padding=1) if downsample else None

    def forward(self, h: torch.Tensor, condition: torch.Tensor, time: torch.Tensor):
        h = _run(self.blocks, self.inject(_with_condition([h], condition)), time)
        return h, (self.downsample(h) if self.downsample is not None else h)


class UpLevel(nn.Module):
    """Concatenation of the features from below, the level's skip and the condition, conv3x3 to the level's width,
    blocks, then nearest ×2 upsampling + conv3x3 (not at level 0)."""

    def __init__(self, channels_in: int, width: int, cfg: UNetConfig, *, attention: bool, upsample: bool):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        self.inject = nn.Conv2d(channels_in + width + cfg.condition_channels, width, 3, padding=1)
        self.blocks = _blocks(width, cfg, act, attention)
        self.upsample = nn.Conv2d(width, width, 3, padding=1) if upsample else None

    def forward(self, h: torch.Tensor, skip: torch.Tensor, condition: torch.Tensor, time: torch.Tensor):
        h = _run(self.blocks, self.inject(_with_condition([h, skip], condition)), time)
        if self.upsample is not None:
            h = self.upsample(nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h


class Middle(nn.Module):
    """Condition injection, then ResBlock, self-attention, ResBlock at the lowest resolution."""

    def __init__(self, width: int, cfg: UNetConfig):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        self.inject = nn.Conv2d(width + cfg.condition_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList([
            ResBlock(width, width, time_dim=cfg.time_embedding_dim, activation=act, dropout=cfg.dropout),
            SelfAttention(width, heads=cfg.attention_heads, head_dim=cfg.attention_head_dim, dropout=cfg.dropout),
            ResBlock(width, width, time_dim=cfg.time_embedding_dim, activation=act, dropout=cfg.dropout),
        ])

    def forward(self, h: torch.Tensor, condition: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return _run(self.blocks, self.inject(_with_condition([h], condition)), time)


def _blocks(width: int, cfg: UNetConfig, act: type[nn.Module], attention: bool) -> nn.ModuleList:
    blocks: list[nn.Module] = []
    for _ in range(cfg.blocks_per_level):
        blocks.append(ResBlock(width, width, time_dim=cfg.time_embedding_dim, activation=act, dropout=cfg.dropout))
        if attention:
            blocks.append(SelfAttention(width, heads=cfg.attention_heads, head_dim=cfg.attention_head_dim,
                                        dropout=cfg.dropout))
    return nn.ModuleList(blocks)


def _run(blocks: nn.ModuleList, h: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        h = block(h, time) if isinstance(block, ResBlock) else block(h)
    return h


class McUNet(nn.Module):
    """ε_θ(x_t, t, c): the mcLDM denoiser (see the module docstring). Output shape = input shape; H and W must be
    multiples of 2^(levels - 1)."""

    def __init__(self, config: UNetConfig, *, in_channels: int, condition_dim: int):
        super().__init__()
        cfg = self.config = config
        levels = len(cfg.channel_mult)
        for key in ("start_channels", "blocks_per_level", "attention_heads", "attention_head_dim",
                    "condition_channels", "time_embedding_dim", "positional_dim"):
            if getattr(cfg, key) < 1:
                raise ValueError(f"UNetConfig.{key} must be ≥ 1, got {getattr(cfg, key)}")
        if levels < 1 or any(m < 1 for m in cfg.channel_mult):
            raise ValueError(f"UNetConfig.channel_mult must be a non-empty list of integers ≥ 1, "
                             f"got {cfg.channel_mult}")
        if not all(0 <= level < levels for level in cfg.attention_levels):
            raise ValueError(f"UNetConfig.attention_levels must lie in [0, {levels - 1}], got {cfg.attention_levels}")
        if not 0 <= cfg.dropout < 1:
            raise ValueError(f"UNetConfig.dropout must lie in [0, 1), got {cfg.dropout}")
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"UNetConfig.activation must be one of {', '.join(ACTIVATIONS)}, got {cfg.activation!r}")
        act = ACTIVATIONS[cfg.activation]
        self.in_channels, self.condition_dim, self.levels = in_channels, condition_dim, levels
        widths = [cfg.start_channels * m for m in cfg.channel_mult]
        self.widths = widths

        self.time_embedding = TimeEmbedding(cfg.positional_dim, cfg.time_embedding_dim, act)
        # one shared condition map; each injection site has its own conv over [features, condition]
        self.condition_map = nn.Sequential(nn.Linear(condition_dim, cfg.condition_channels),
                                           nn.LayerNorm(cfg.condition_channels))
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList([
            DownLevel(widths[i - 1] if i > 0 else widths[0], widths[i], cfg, attention=i in cfg.attention_levels,
                      downsample=i < levels - 1)
            for i in range(levels)])
        self.middle = Middle(widths[-1], cfg)
        # up[0] is the deepest level, up[-1] level 0
        self.up = nn.ModuleList([
            UpLevel(widths[min(i + 1, levels - 1)], widths[i], cfg, attention=i in cfg.attention_levels,
                    upsample=i > 0)
            for i in reversed(range(levels))])
        self.out = nn.Sequential(group_norm(widths[0]), act(), nn.Conv2d(widths[0], in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) noisy latents, t (B,) time steps (long or float), condition (B, condition_dim) the
        condition embedding → predicted ε (B, C, H, W)."""
        factor = 2 ** (self.levels - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"McUNet: H and W must be multiples of 2^(levels - 1) = {factor}, got {tuple(x.shape)}")
        time = self.time_embedding(t)
        c = self.condition_map(condition)
        h = self.stem(x)
        skips = []
        for level in self.down:
            skip, h = level(h, c, time)
            skips.append(skip)
        h = self.middle(h, c, time)
        for level in self.up:
            h = level(h, skips.pop(), c, time)
        return self.out(h)

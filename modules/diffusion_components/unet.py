"""The mcLDM denoiser: a UNet over VAE latents that predicts the noise ε from (x_t, t, masked condition embedding).

Conditioning as in the mcLDM paper: no cross-attention. At the entry of every resolution level the condition
embedding vector (`ConditionEmbedding.out_dim` wide) is mapped by that level's own Linear + LayerNorm to
`condition_channels`, broadcast over H×W and concatenated to the features; the first ResBlock of the level takes the
concatenation. The time step enters every ResBlock as a projected sinusoidal embedding.

Two layouts (`UNetConfig.layout`):

- `paper` (default) — the authors' UNet (their `mcUnet`, configs/mcldm_biked.yaml: start_channels 64, 4 levels,
  4 ResBlocks per level, attention at levels 1–3) with its bugs fixed. Level i works at width
  start_channels · channel_mult[i] (doubling: 64, 128, 256, 512); its ResBlocks are followed by one self-attention
  block at attention levels, then a stride-2 conv to the next width. The bottleneck (ResBlock, attention, ResBlock)
  runs at 2× the last width (1024) and 1/2^levels of the latent side. As in the authors' code each up level runs
  one resolution below its down level and upsamples at its end (`McUNet` has the details). GroupNorm has
  `norm_groups` (32) groups or the largest divisor of the channels below. Fixed against the authors' code: level
  0's skip reaches the output (theirs is dropped), attention heads are split from the channel axis (theirs
  reshapes channels into positions), dropout acts in training only, and the masks are drawn once per sampling run
  (theirs re-draws them at every denoising step).
- `per_block_attention` — the layout this project used before: attention after every ResBlock of an attention
  level, widths set by `channel_mult` ([1, 3, 6, 8] matched the paper's parameter count), ≤ 8 GroupNorm groups, one
  shared condition map with a conv3x3 per injection site, the bottleneck at the last level's resolution. Kept to
  load checkpoints trained with it; README "mcLDM" compares the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import nn

from modules.layers import SelfAttention, group_norm
from modules.mcvae import ACTIVATIONS

LAYOUTS = ("paper", "per_block_attention")


@dataclass
class UNetConfig:
    layout: Literal["paper", "per_block_attention"] = "paper"  # see the module docstring
    start_channels: int = 64  # width of level 0
    # level i has width start_channels · channel_mult[i]; levels = its length. The paper doubles per level.
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    blocks_per_level: int = 4  # ResBlocks per level on the down path and on the up path
    # levels with self-attention (paper: one block after the level's ResBlocks); the bottleneck always has one
    attention_levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    attention_heads: int = 8
    attention_head_dim: int = 64
    condition_channels: int = 10  # the mapped condition embedding concatenated at every level
    time_embedding_dim: int = 128  # MLP output added in every ResBlock
    positional_dim: int = 64  # sinusoidal features of t fed to that MLP
    activation: Literal["selu", "relu", "gelu", "silu", "tanh", "elu"] = "selu"
    dropout: float = 0.05  # in the ResBlocks and the attention weights (training only)
    norm_groups: int = 32  # GroupNorm groups, or the largest divisor of the channels below (paper layout)


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
                 dropout: float, norm_groups: Optional[int] = None):
        super().__init__()
        self.inner = nn.Sequential(group_norm(channels_in, norm_groups), activation(),
                                   nn.Conv2d(channels_in, channels_out, 3, padding=1))
        self.time = nn.Sequential(activation(), nn.Linear(time_dim, channels_out))
        # a GroupNorm of one channel per group would remove the per-channel time bias added just before it
        groups_after_time = None if norm_groups is None else max(1, min(norm_groups, channels_out // 2))
        self.outer = nn.Sequential(group_norm(channels_out, groups_after_time), activation(), nn.Dropout(dropout),
                                   nn.Conv2d(channels_out, channels_out, 3, padding=1))
        nn.init.zeros_(self.outer[-1].weight)
        nn.init.zeros_(self.outer[-1].bias)
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        h = h + self.time(time)[:, :, None, None].to(h.dtype)
        return self.skip(x) + self.outer(h)



def unet_cost(cfg: UNetConfig, *, latent_shape: tuple[int, int, int], condition_dim: int) -> dict[str, float]:
    """Parameters and GFLOP per sample of one training step (forward + backward) and of one forward pass (a
    sampling step), counted by `torch.utils.flop_counter` on the meta device: no memory, about a second."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build_unet(cfg, in_channels=latent_shape[0], condition_dim=condition_dim)
        x, t, c = torch.zeros(1, *latent_shape), torch.zeros(1, dtype=torch.long), torch.zeros(1, condition_dim)
        with FlopCounterMode(display=False) as counter:
            net(x, t, c).sum().backward()
        train = counter.get_total_flops()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(x, t, c)
    return {"parameters": count_parameters(net), "train_gflop_per_sample": train / 1e9,
            "forward_gflop_per_sample": counter.get_total_flops() / 1e9}


def downsampling_factor(cfg: UNetConfig) -> int:
    """What the latent sides must be multiples of: the paper layout halves them once per level, the
    per-block-attention layout once per level but the last."""
    levels = len(cfg.channel_mult)
    return 2 ** (levels if cfg.layout == "paper" else levels - 1)


def _check_size(x: torch.Tensor, cfg: UNetConfig) -> None:
    factor = downsampling_factor(cfg)
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"the {cfg.layout} UNet needs H and W that are multiples of {factor}, got {tuple(x.shape)}")


def check_unet_config(cfg: UNetConfig) -> None:
    for key in ("start_channels", "blocks_per_level", "attention_heads", "attention_head_dim",
                "condition_channels", "time_embedding_dim", "positional_dim", "norm_groups"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"UNetConfig.{key} must be ≥ 1, got {getattr(cfg, key)}")
    levels = len(cfg.channel_mult)
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"UNetConfig.layout must be one of {', '.join(LAYOUTS)}, got {cfg.layout!r}")
    if levels < 1 or any(m < 1 for m in cfg.channel_mult):
        raise ValueError(f"UNetConfig.channel_mult must be a non-empty list of integers ≥ 1, got {cfg.channel_mult}")
    if not all(0 <= level < levels for level in cfg.attention_levels):
        raise ValueError(f"UNetConfig.attention_levels must lie in [0, {levels - 1}], got {cfg.attention_levels}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"UNetConfig.dropout must lie in [0, 1), got {cfg.dropout}")
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"UNetConfig.activation must be one of {', '.join(ACTIVATIONS)}, got {cfg.activation!r}")


def build_unet(cfg: UNetConfig, *, in_channels: int, condition_dim: int) -> nn.Module:
    """The UNet of `cfg.layout`."""
    cls = McUNet if cfg.layout == "paper" else PerBlockAttentionUNet
    return cls(cfg, in_channels=in_channels, condition_dim=condition_dim)


# ---------------------------------------------------------------------------------------------- the paper layout


class ConditionMap(nn.Module):
    """A level's own map of the condition embedding to `condition_channels` (the paper: a Linear per level). The
    authors normalise with BatchNorm1d; LayerNorm is used here because it treats each example on its own: a
    sampling batch is one prompt's copies plus their all-masked twins, nothing like a training batch."""

    def __init__(self, condition_dim: int, channels: int):
        super().__init__()
        self.map = nn.Sequential(nn.Linear(condition_dim, channels), nn.LayerNorm(channels))

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.map(condition)


def _res_blocks(first_in: int, width: int, cfg: UNetConfig, act: type[nn.Module]) -> nn.ModuleList:
    """`blocks_per_level` ResBlocks, the first from `first_in` channels to the level's width."""
    return nn.ModuleList([
        ResBlock(first_in if i == 0 else width, width, time_dim=cfg.time_embedding_dim, activation=act,
                 dropout=cfg.dropout, norm_groups=cfg.norm_groups)
        for i in range(cfg.blocks_per_level)])


def _attention(width: int, cfg: UNetConfig) -> SelfAttention:
    return SelfAttention(width, heads=cfg.attention_heads, head_dim=cfg.attention_head_dim, dropout=cfg.dropout,
                         norm_groups=cfg.norm_groups)


class PaperDownLevel(nn.Module):
    """[features, mapped condition] → ResBlocks → self-attention (attention levels) = the skip; a stride-2 conv
    to the next level's width."""

    def __init__(self, width: int, next_width: int, condition_dim: int, cfg: UNetConfig, *, attention: bool):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        self.condition = ConditionMap(condition_dim, cfg.condition_channels)
        self.blocks = _res_blocks(width + cfg.condition_channels, width, cfg, act)
        self.attention = _attention(width, cfg) if attention else None
        self.downsample = nn.Conv2d(width, next_width, 3, stride=2, padding=1)

    def forward(self, h: torch.Tensor, condition: torch.Tensor, time: torch.Tensor):
        h = _with_condition([h], self.condition(condition))
        for block in self.blocks:
            h = block(h, time)
        if self.attention is not None:
            h = self.attention(h)
        return h, self.downsample(h)


class PaperUpLevel(nn.Module):
    """Up level i of the authors' layout, at the resolution of level i + 1: [features from below, the skip of that
    resolution, mapped condition] → ResBlocks to level i's width → self-attention (attention levels) → nearest ×2 +
    conv3x3 to level i's resolution."""

    def __init__(self, below_width: int, skip_width: int, width: int, condition_dim: int, cfg: UNetConfig, *,
                 attention: bool):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        self.condition = ConditionMap(condition_dim, cfg.condition_channels)
        self.blocks = _res_blocks(below_width + skip_width + cfg.condition_channels, width, cfg, act)
        self.attention = _attention(width, cfg) if attention else None
        self.upsample = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor, skip: torch.Tensor, condition: torch.Tensor, time: torch.Tensor):
        h = _with_condition([h, skip], self.condition(condition))
        for block in self.blocks:
            h = block(h, time)
        if self.attention is not None:
            h = self.attention(h)
        return self.upsample(nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))


class McUNet(nn.Module):
    """ε_θ(x_t, t, c), the paper layout: the authors' `mcUnet` with its bugs fixed. Output shape = input shape;
    H and W must be multiples of 2^levels.

    Down level i runs at 1/2^i of the latent side and stores its features as skip i. The up path runs each level
    one resolution lower than its down level, as the authors' does (so the two cost about the same FLOPs): up level
    i takes the skip of level i + 1 (the deepest one the bottleneck's input) and upsamples at its end. Level 0's
    skip, which the authors' code drops, joins at full resolution in the head: one ResBlock over
    [features, skip 0], then GroupNorm-act-conv3x3, zero-initialised so the untrained model predicts ε = 0.
    """

    def __init__(self, config: UNetConfig, *, in_channels: int, condition_dim: int):
        super().__init__()
        cfg = self.config = config
        check_unet_config(cfg)
        act = ACTIVATIONS[cfg.activation]
        self.in_channels, self.condition_dim, self.levels = in_channels, condition_dim, len(cfg.channel_mult)
        self.widths = [cfg.start_channels * m for m in cfg.channel_mult]
        self.bottleneck_width = 2 * self.widths[-1]
        below = self.widths[1:] + [self.bottleneck_width]  # the width after each level's downsampling

        self.time_embedding = TimeEmbedding(cfg.positional_dim, cfg.time_embedding_dim, act)
        self.stem = nn.Conv2d(in_channels, self.widths[0], 3, padding=1)
        self.down = nn.ModuleList([
            PaperDownLevel(w, below[i], condition_dim, cfg, attention=i in cfg.attention_levels)
            for i, w in enumerate(self.widths)])
        wb = self.bottleneck_width
        self.middle = nn.ModuleList([
            ResBlock(wb, wb, time_dim=cfg.time_embedding_dim, activation=act, dropout=cfg.dropout,
                     norm_groups=cfg.norm_groups),
            _attention(wb, cfg),
            ResBlock(wb, wb, time_dim=cfg.time_embedding_dim, activation=act, dropout=cfg.dropout,
                     norm_groups=cfg.norm_groups)])
        # up[0] is the deepest level, up[-1] level 0; up level i gets features and a skip of width below[i]
        self.up = nn.ModuleList([
            PaperUpLevel(below[i], below[i], self.widths[i], condition_dim, cfg, attention=i in cfg.attention_levels)
            for i in reversed(range(self.levels))])
        w0 = self.widths[0]
        self.head = ResBlock(2 * w0, w0, time_dim=cfg.time_embedding_dim, activation=act, dropout=cfg.dropout,
                             norm_groups=cfg.norm_groups)
        self.out = nn.Sequential(group_norm(w0, cfg.norm_groups), act(), nn.Conv2d(w0, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) noisy latents, t (B,) time steps (long or float), condition (B, condition_dim) the
        condition embedding → predicted ε (B, C, H, W)."""
        _check_size(x, self.config)
        time = self.time_embedding(t)
        h = self.stem(x)
        skips = []
        for level in self.down:
            skip, h = level(h, condition, time)
            skips.append(skip)
        skips.append(h)  # the bottleneck's input: the deepest up level's skip
        h = _run(self.middle, h, time)
        for level in self.up:
            h = level(h, skips.pop(), condition, time)
        h = self.head(_with_condition([h, skips.pop()], None), time)
        return self.out(h)


# ------------------------------------------------------------------------------- the per-block-attention layout


def _with_condition(features: list[torch.Tensor], condition: Optional[torch.Tensor]) -> torch.Tensor:
    """The features concatenated along the channels with the condition (B, K) broadcast over H×W (none: the
    features alone), in the features' dtype and memory format (so the concatenation stays channels_last under
    autocast)."""
    first = features[0]
    if condition is None:
        return torch.cat(features, dim=1)
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
            ResBlock(width, width, time_dim=cfg.time_embedding_dim, activation=act, dropout=cfg.dropout,
                     norm_groups=cfg.norm_groups),
            SelfAttention(width, heads=cfg.attention_heads, head_dim=cfg.attention_head_dim, dropout=cfg.dropout,
                          norm_groups=cfg.norm_groups),
            ResBlock(width, width, time_dim=cfg.time_embedding_dim, activation=act, dropout=cfg.dropout,
                     norm_groups=cfg.norm_groups),
        ])

    def forward(self, h: torch.Tensor, condition: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return _run(self.blocks, self.inject(_with_condition([h], condition)), time)


def _blocks(width: int, cfg: UNetConfig, act: type[nn.Module], attention: bool) -> nn.ModuleList:
    blocks: list[nn.Module] = []
    for _ in range(cfg.blocks_per_level):
        blocks.append(ResBlock(width, width, time_dim=cfg.time_embedding_dim, activation=act, dropout=cfg.dropout,
                               norm_groups=cfg.norm_groups))
        if attention:
            blocks.append(SelfAttention(width, heads=cfg.attention_heads, head_dim=cfg.attention_head_dim,
                                        dropout=cfg.dropout, norm_groups=cfg.norm_groups))
    return nn.ModuleList(blocks)


def _run(blocks: nn.ModuleList, h: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        h = block(h, time) if isinstance(block, ResBlock) else block(h)
    return h


class PerBlockAttentionUNet(nn.Module):
    """ε_θ(x_t, t, c), the per-block-attention layout (module docstring). Output shape = input shape; H and W must
    be multiples of 2^(levels - 1)."""

    def __init__(self, config: UNetConfig, *, in_channels: int, condition_dim: int):
        super().__init__()
        cfg = self.config = config
        levels = len(cfg.channel_mult)
        check_unet_config(cfg)
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
        self.out = nn.Sequential(group_norm(widths[0], cfg.norm_groups), act(), nn.Conv2d(widths[0], in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) noisy latents, t (B,) time steps (long or float), condition (B, condition_dim) the
        condition embedding → predicted ε (B, C, H, W)."""
        _check_size(x, self.config)
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

"""conv-mcVAE: a convolutional VAE over images whose decoder sees the masked condition embedding.

Encoder: stem conv → per level `blocks_per_level` ResBlocks (GroupNorm) with optional self-attention, then a
stride-2 conv → a bottleneck to `latent_channels` (mean, log-variance). The condition embedding is mapped,
normalised, broadcast over the latent's spatial size and concatenated to z. The decoder mirrors the encoder with
learned (transposed-conv) upsampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from modules.base import ImageSampling, MaskedConditionalVAE
from modules.conditioning import MaskedConditions
from modules.config import (ConditioningConfig, EvaluationConfig, LRSchedulerConfig, OptimizerConfig, SparsityConfig,
                            TrainerConfig, WandbConfig)
from modules.image_data import ImageDataConfig
from modules.image_evaluation import SampleGridConfig, check_sample_grid
from modules.layers import SelfAttention, group_norm
from modules.mcvae import ACTIVATIONS, kl_divergence


@dataclass
class ConvMCVAEModelConfig:
    image_embedding_dim: int = 16  # channels of the stem conv
    start_channels: int = 16  # channels of level 0; level i has start_channels · 2^i
    levels: int = 5  # each level halves the resolution: 256 px → 8×8 latents with 5 levels
    blocks_per_level: int = 2
    attention_levels: list[int] = field(default_factory=lambda: [3, 4])
    attention_heads: int = 3
    attention_head_dim: int = 64
    latent_channels: int = 4
    condition_channels: int = 10  # the mapped condition embedding concatenated to z
    activation: Literal["selu", "relu", "gelu", "silu", "tanh", "elu"] = "selu"
    dropout: float = 0.15
    kl_weight: float = 0.9  # loss = (1 - w)·MSE + w·KL, both mean-reduced
    ema_decay: Optional[float] = None


@dataclass
class ConvMCVAERunConfig:
    model_type: Literal["conv_mcvae"]
    data: ImageDataConfig
    model: ConvMCVAEModelConfig = field(default_factory=ConvMCVAEModelConfig)
    conditioning: ConditioningConfig = field(default_factory=lambda: ConditioningConfig(embedding_dim=5))
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=0.0018, betas=(0.54, 0.94),
                                                                               weight_decay=0.15))
    lr_scheduler: LRSchedulerConfig = field(default_factory=lambda: LRSchedulerConfig(name="none"))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_epochs=400, batch_size=140))
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    sample_grid: SampleGridConfig = field(default_factory=SampleGridConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def check_conv_mcvae_config(cfg: ConvMCVAERunConfig, source: str) -> None:
    """Ranges of the model section, and an image size the levels can halve down to at least 1×1."""
    from modules.training import require

    m = cfg.model
    for key in ("image_embedding_dim", "start_channels", "levels", "blocks_per_level", "attention_heads",
                "attention_head_dim", "latent_channels", "condition_channels"):
        require(getattr(m, key) >= 1, source, f"model.{key}", "≥ 1", getattr(m, key))
    require(all(0 <= level < m.levels for level in m.attention_levels), source, "model.attention_levels",
            f"levels in [0, {m.levels - 1}]", m.attention_levels)
    require(0 <= m.dropout < 1, source, "model.dropout", "in [0, 1)", m.dropout)
    require(0 <= m.kl_weight <= 1, source, "model.kl_weight", "in [0, 1]", m.kl_weight)
    check_sample_grid(cfg, source)
    size = cfg.data.image_size
    require(size % (2 ** m.levels) == 0, source, "data.image_size", f"a multiple of 2^levels = {2 ** m.levels}", size)


class ResBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))), with a 1×1 skip when the channel count changes (He et al. 2016)."""

    def __init__(self, channels_in: int, channels_out: int, *, activation: type[nn.Module], dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(channels_in), activation(), nn.Conv2d(channels_in, channels_out, 3, padding=1),
            group_norm(channels_out), activation(), nn.Dropout(dropout), nn.Conv2d(channels_out, channels_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.body(x)


def _level(channels_in: int, channels_out: int, m: ConvMCVAEModelConfig, act, attention: bool) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for i in range(m.blocks_per_level):
        blocks.append(ResBlock(channels_in if i == 0 else channels_out, channels_out, activation=act,
                               dropout=m.dropout))
        if attention:
            blocks.append(SelfAttention(channels_out, heads=m.attention_heads, head_dim=m.attention_head_dim,
                                        dropout=m.dropout))
    return nn.Sequential(*blocks)


class ConvMCVAE(ImageSampling, MaskedConditionalVAE):
    """q(z | x) over images only; p(x | z, c) with the mapped condition embedding broadcast over z's positions."""

    config_cls = ConvMCVAERunConfig
    model_type = "conv_mcvae"

    def __init__(self, *, config: dict, schema: dict, split_digest: Optional[str] = None):
        super().__init__(config=config, schema=schema)
        self.save_hyperparameters()
        m, d = self.cfg.model, self.cfg.data
        act = ACTIVATIONS[m.activation]
        widths = [m.start_channels * 2 ** i for i in range(m.levels)]
        # encoder
        self.stem = nn.Conv2d(d.channels, m.image_embedding_dim, 3, padding=1)
        down, previous = [], m.image_embedding_dim
        for i, width in enumerate(widths):
            down.append(nn.Sequential(_level(previous, width, m, act, i in m.attention_levels),
                                      nn.Conv2d(width, width, 3, stride=2, padding=1)))
            previous = width
        self.down = nn.ModuleList(down)
        self.to_posterior = nn.Sequential(group_norm(previous), act(), nn.Conv2d(previous, 2 * m.latent_channels, 1))
        # condition → channels, normalised, broadcast over the latent grid
        self.condition_map = nn.Sequential(nn.Linear(self.embedding.out_dim, m.condition_channels),
                                           nn.LayerNorm(m.condition_channels))
        # decoder (mirror, learned upsampling)
        self.from_latent = nn.Conv2d(m.latent_channels + m.condition_channels, widths[-1], 3, padding=1)
        up = []
        for i in reversed(range(m.levels)):
            width, below = widths[i], widths[i - 1] if i > 0 else m.image_embedding_dim
            up.append(nn.Sequential(_level(width, width, m, act, i in m.attention_levels),
                                    nn.ConvTranspose2d(width, below, 4, stride=2, padding=1)))
        self.up = nn.ModuleList(up)
        self.head = nn.Sequential(group_norm(m.image_embedding_dim), act(),
                                  nn.Conv2d(m.image_embedding_dim, d.channels, 3, padding=1))
        self.enable_ema(m.ema_decay)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        m = self.cfg.model
        side = self.cfg.data.image_size // 2 ** m.levels
        return m.latent_channels, side, side

    def generative_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"embedding": self.embedding, "condition_map": self.condition_map,
                              "from_latent": self.from_latent, "up": self.up, "head": self.head})

    # ------------------------------------------------------------------ model
    def encode(self, images: torch.Tensor, c: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x) over the image only (c is not used)."""
        h = self.stem(images)
        for level in self.down:
            h = level(h)
        mu, logvar = self.to_posterior(h).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor, c: torch.Tensor, *, averaged: bool = False) -> torch.Tensor:
        """p(x | z, c) from the condition embedding c; `averaged` uses the EMA weights when the model keeps them."""
        parts = self.ema.shadow if averaged and self.ema is not None else self.generative_modules()
        c = parts["condition_map"](c)
        h = parts["from_latent"](torch.cat([z, c[:, :, None, None].expand(-1, -1, *z.shape[2:])], dim=1))
        for level in parts["up"]:
            h = level(h)
        return parts["head"](h)

    def loss(self, images, reconstruction, mu, logvar, prior=None) -> dict[str, torch.Tensor]:
        """(1 - w)·MSE + w·KL, both mean-reduced (the KL per latent element, averaged over the batch)."""
        w = self.cfg.model.kl_weight
        rec = F.mse_loss(reconstruction, images)
        kl = kl_divergence(mu.flatten(1), logvar.flatten(1)).mean() / mu[0].numel()
        return {"loss": (1 - w) * rec + w * kl, "reconstruction": rec, "kl": kl}

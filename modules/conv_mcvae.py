"""conv-mcVAE: a convolutional VAE over images whose decoder sees the masked condition embedding.

Encoder: stem conv → per level `blocks_per_level` ResBlocks (GroupNorm) with optional self-attention, then a
stride-2 conv → a bottleneck to `latent_channels` (mean, log-variance). The condition embedding is mapped,
normalised, broadcast over the latent's spatial size and concatenated to z. The decoder mirrors the encoder with
learned (transposed-conv) upsampling.

The paper's objective, (1 − w)·MSE + w·KL both mean-reduced with w = 0.9, weighs one latent element's KL nine
times one pixel's squared error: the posterior collapses to the prior and the decoder draws one average image
per set of conditions. The options below make it a generative model, as for the mcVAE (README, "Generative
defaults"): the ELBO of a Gaussian decoder (`reconstruction: gaussian_nll`), a conditional prior p(z | c), and the
condition at every decoder level (`decoder_conditions: every_level`, as the mcLDM's UNet).

Under the ELBO alone the decoder still reads the conditions from z, where the encoder always writes them, rather
than from c: samples drew the majority fork and rim whatever was asked. The condition critic
(`modules/condition_critic.py`, `critic_*` options, off by default) pushes images decoded from z ~ p(z | c) to
show c; measured, it helps rare categories but costs image quality (benchmarks/RESULTS.md, "conv-mcVAE
ablation 2"). The training step is `MaskedConditioningModule.training_step` → `MaskedConditionalVAE._step`
(+ `auxiliary_losses` here).
"""
from __future__ import annotations

import math
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
from modules.mcvae import ACTIVATIONS, gaussian_nll, kl_divergence


@dataclass
class ConvMCVAEModelConfig:
    image_embedding_dim: int = 16  # channels of the stem conv
    # 1: the paper's encoder, level i at size / 2^i; 2: a stride-2 stem, so the encoder's levels run at the
    # decoder's sizes (size / 2^(i+1); the last level does not downsample) for about a quarter of its FLOPs
    stem_stride: Literal[1, 2] = 1
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
    # loss = (1 − w)·reconstruction + w·KL. mse: the paper's, pixel MSE and the KL per latent element, both
    # mean-reduced; gaussian_nll: −log N(x; x̂, σ²) summed over pixels and the KL summed over the latent, per image
    # (w = 0.5: ½·(−ELBO), Kingma & Welling 2014, Eq. 10)
    kl_weight: float = 0.9
    reconstruction: Literal["mse", "gaussian_nll"] = "mse"
    decoder_sigma: Optional[float] = 0.1  # gaussian_nll: σ of every pixel (value-range units); null = one learned σ
    # the prior of z: N(0, I) (the paper) or p(z | c) = N(μ(c), σ²(c)) over the whole latent grid, from the masked
    # condition embedding, so that sampled latents agree with the conditions asked for
    prior: Literal["standard", "conditional"] = "standard"
    prior_hidden_dim: int = 128
    # latent: the mapped condition concatenated to z only (the paper); every_level: also a 1×1 conv of it added to
    # the input of every decoder level (the same as concatenating it and a 1×1 conv), so the condition reaches the
    # fine resolutions directly; film: every level's input scaled and shifted by it, h·(1 + γ(c)) + β(c)
    # (feature-wise modulation, Perez et al. 2018), which can switch features on and off
    decoder_conditions: Literal["latent", "every_level", "film"] = "latent"
    # broadcast: the mapped condition is one vector copied to every position of the latent grid (the paper);
    # spatial: a map over the grid (a Linear to condition_channels × side × side), so a condition can say *where*
    # (the fork sits at the front wheel); upsampled (nearest) to each decoder level
    condition_layout: Literal["broadcast", "spatial"] = "broadcast"
    # the encoder sees the masked conditions too, q(z | x, c) (a CVAE): z need not carry what c says
    encoder_conditions: bool = False
    temperature: float = 1.0  # z = μ_p + τ·σ_p·ε at generation; < 1 trades diversity for typical images
    # > 0: images decoded from z ~ p(z | c) for the first `critic_batch` rows of a batch must show their visible
    # conditions to a critic CNN that learns them from the real images of the step; the weight of that loss
    # (modules/condition_critic.py). Without it the decoder reads the conditions from z and samples ignore c
    critic_weight: float = 0.0
    critic_batch: int = 32
    critic_width: int = 16  # channels of the critic's first conv
    # > 0: the critic also tells real from generated images and the generator is pushed (this weight) to make its
    # samples pass for real (a GAN loss on the prior's samples; the reconstructions keep the ELBO)
    critic_realism_weight: float = 0.0
    # α: the generator's cross-entropy of a row weighs its asked category's training frequency^−α, so rare
    # categories (a seat-tube bottle: 9 %, a disc rim: 4 %) count for more (0: plain; 1: every category alike)
    critic_balance: float = 0.0
    # the generator's 1 − R² of a numerical condition against a categorical one's cross-entropy (a chainring of
    # 2–4 px is a faint ring at 64 px: its term is small beside the rest)
    critic_numerical_weight: float = 1.0
    # > 0: every image the critic sees (real and generated) is shifted by up to this fraction of the image size
    # each way, so that the critic reads the condition rather than where it sits in the training images
    critic_shift: float = 0.0
    ema_decay: Optional[float] = None


@dataclass
class ConvMCVAESpeedConfig:
    # NHWC weights and activations: 1.13× per training step on the 2-core CPU, same numbers up to float
    # reassociation (benchmarks/bench_conv_mcvae.py; RESULTS.md, "conv-mcVAE speed")
    channels_last: bool = True


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
    speed: ConvMCVAESpeedConfig = field(default_factory=ConvMCVAESpeedConfig)
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
    require(m.decoder_sigma is None or m.decoder_sigma > 0, source, "model.decoder_sigma", "> 0 or null",
            m.decoder_sigma)
    require(m.prior_hidden_dim >= 1, source, "model.prior_hidden_dim", "≥ 1", m.prior_hidden_dim)
    require(m.critic_weight >= 0, source, "model.critic_weight", "≥ 0 (0: no critic)", m.critic_weight)
    require(m.critic_realism_weight >= 0, source, "model.critic_realism_weight", "≥ 0", m.critic_realism_weight)
    require(m.critic_numerical_weight >= 0, source, "model.critic_numerical_weight", "≥ 0", m.critic_numerical_weight)
    require(0 <= m.critic_balance <= 1, source, "model.critic_balance", "in [0, 1]", m.critic_balance)
    require(0 <= m.critic_shift < 0.5, source, "model.critic_shift", "in [0, 0.5) (a fraction of the image size)",
            m.critic_shift)
    for key in ("critic_batch", "critic_width"):
        require(getattr(m, key) >= 1, source, f"model.{key}", "≥ 1", getattr(m, key))
    require(m.temperature >= 0, source, "model.temperature", "≥ 0 (0: the prior mean)", m.temperature)
    require(m.ema_decay is None or 0 < m.ema_decay < 1, source, "model.ema_decay", "in (0, 1) or null", m.ema_decay)
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
        if m.stem_stride == 2:
            self.stem = nn.Conv2d(d.channels, m.image_embedding_dim, 4, stride=2, padding=1)
        else:
            self.stem = nn.Conv2d(d.channels, m.image_embedding_dim, 3, padding=1)
        down, previous = [], m.image_embedding_dim
        for i, width in enumerate(widths):
            last_without_downsampling = m.stem_stride == 2 and i == len(widths) - 1
            down.append(nn.Sequential(_level(previous, width, m, act, i in m.attention_levels),
                                      nn.Identity() if last_without_downsampling else
                                      nn.Conv2d(width, width, 3, stride=2, padding=1)))
            previous = width
        self.down = nn.ModuleList(down)
        encoder_extra = m.condition_channels if m.encoder_conditions else 0
        self.to_posterior = nn.Sequential(group_norm(previous + encoder_extra), act(),
                                          nn.Conv2d(previous + encoder_extra, 2 * m.latent_channels, 1))
        # condition → channels (broadcast over the latent grid) or a map over the grid, normalised
        side = d.image_size // 2 ** m.levels
        mapped = m.condition_channels * (side * side if m.condition_layout == "spatial" else 1)
        self.condition_map = nn.Sequential(nn.Linear(self.embedding.out_dim, mapped), nn.LayerNorm(mapped))
        # decoder (mirror, learned upsampling)
        self.from_latent = nn.Conv2d(m.latent_channels + m.condition_channels, widths[-1], 3, padding=1)
        up = []
        for i in reversed(range(m.levels)):
            width, below = widths[i], widths[i - 1] if i > 0 else m.image_embedding_dim
            up.append(nn.Sequential(_level(width, width, m, act, i in m.attention_levels),
                                    nn.ConvTranspose2d(width, below, 4, stride=2, padding=1)))
        self.up = nn.ModuleList(up)
        # every_level / film: a 1×1 conv of the mapped condition per decoder level, to that level's input channels
        # (film: γ and β, zero-initialised so that training starts from the unmodulated decoder)
        per_level = {"every_level": 1, "film": 2}.get(m.decoder_conditions)
        self.level_conditions = None
        if per_level:
            self.level_conditions = nn.ModuleList(nn.Conv2d(m.condition_channels, per_level * widths[i], 1)
                                                  for i in reversed(range(m.levels)))
            if m.decoder_conditions == "film":
                for conv in self.level_conditions:
                    nn.init.zeros_(conv.weight)
                    nn.init.zeros_(conv.bias)
        self.head = nn.Sequential(group_norm(m.image_embedding_dim), act(),
                                  nn.Conv2d(m.image_embedding_dim, d.channels, 3, padding=1))
        self.prior_net = (nn.Sequential(nn.Linear(self.embedding.out_dim, m.prior_hidden_dim), act(),
                                        nn.Linear(m.prior_hidden_dim, 2 * m.latent_channels * side * side))
                          if m.prior == "conditional" else None)
        if self.prior_net is not None:  # start at N(0, I): the prior learns where images with c lie
            nn.init.zeros_(self.prior_net[-1].weight)
            nn.init.zeros_(self.prior_net[-1].bias)
        # gaussian_nll: log σ of the decoder, fixed (not saved) or one learned scalar
        if m.reconstruction == "gaussian_nll" and m.decoder_sigma is None:
            self.log_sigma = nn.Parameter(torch.full((1,), math.log(0.1)))
        else:
            fixed = m.reconstruction == "gaussian_nll"
            self.register_buffer("log_sigma", torch.full((1,), math.log(m.decoder_sigma)) if fixed else None,
                                 persistent=False)
        self.condition_critic = None
        if m.critic_weight > 0:
            from modules.condition_critic import ConditionCritic

            self.condition_critic = ConditionCritic(d.channels, self.schema, width=m.critic_width, image_size=d.image_size,
                                                    realism=m.critic_realism_weight > 0, balance=m.critic_balance,
                                                    numerical_weight=m.critic_numerical_weight,
                                                    shift=m.critic_shift)
        self.memory_format = torch.channels_last if self.cfg.speed.channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)  # before the EMA copy, which keeps the layout
        self.enable_ema(m.ema_decay)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        m = self.cfg.model
        side = self.cfg.data.image_size // 2 ** m.levels
        return m.latent_channels, side, side

    def generative_modules(self) -> nn.ModuleDict:
        modules = {"embedding": self.embedding, "condition_map": self.condition_map,
                   "from_latent": self.from_latent, "up": self.up, "head": self.head}
        if self.level_conditions is not None:
            modules["level_conditions"] = self.level_conditions
        if self.prior_net is not None:
            modules["prior_net"] = self.prior_net
        return nn.ModuleDict(modules)

    # ------------------------------------------------------------------ model
    def encode(self, images: torch.Tensor, c: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x), the paper's; q(z | x, c) with `model.encoder_conditions` (c: the condition embedding)."""
        h = self.stem(images.contiguous(memory_format=self.memory_format))
        for level in self.down:
            h = level(h)
        if self.cfg.model.encoder_conditions:
            h = torch.cat([h, self._condition_grid(self.condition_map(c), h.shape[-1])], dim=1)
        mu, logvar = self.to_posterior(h).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor, c: torch.Tensor, *, averaged: bool = False) -> torch.Tensor:
        """p(x | z, c) from the condition embedding c; `averaged` uses the EMA weights when the model keeps them."""
        parts = self.ema.shadow if averaged and self.ema is not None else self.generative_modules()
        c = parts["condition_map"](c)
        h = torch.cat([z, self._condition_grid(c, z.shape[-1])], dim=1)
        h = parts["from_latent"](h.contiguous(memory_format=self.memory_format))
        film = self.cfg.model.decoder_conditions == "film"
        for i, level in enumerate(parts["up"]):
            if "level_conditions" in parts:
                conv = parts["level_conditions"][i]
                if self.cfg.model.condition_layout == "broadcast":  # the 1×1 conv of a constant grid, per vector
                    injected = F.linear(c, conv.weight.flatten(1), conv.bias)[:, :, None, None]
                else:
                    injected = conv(self._condition_grid(c, h.shape[-1]))
                if film:
                    gamma, beta = injected.chunk(2, dim=1)
                    h = h * (1 + gamma) + beta
                else:
                    h = h + injected
            h = level(h)
        return parts["head"](h).contiguous()  # NCHW out: callers index and save images

    def _condition_grid(self, mapped: torch.Tensor, size: int) -> torch.Tensor:
        """The mapped condition as a (B, condition_channels, size, size) grid: a broadcast vector, or the spatial map
        upsampled (nearest) from the latent grid."""
        m = self.cfg.model
        if m.condition_layout == "broadcast":
            grid = mapped[:, :, None, None].expand(-1, -1, size, size)
        else:
            side = self.latent_shape[1]
            grid = mapped.reshape(len(mapped), m.condition_channels, side, side)
            if size != side:
                grid = F.interpolate(grid, size=(size, size), mode="nearest")
        return grid.contiguous(memory_format=self.memory_format)

    def auxiliary_losses(self, x, cat, num, masked, c, z, generator) -> dict:
        out = super().auxiliary_losses(x, cat, num, masked, c, z, generator)
        if self.condition_critic is None:
            return out
        m = self.cfg.model
        n = min(m.critic_batch, len(x))
        asked, c_asked = masked.rows(0, n), c[:n]
        eps = torch.randn((n, *self.latent_shape), generator=generator, device=x.device, dtype=x.dtype)
        generated = self.decode(self.from_prior(eps, c_asked), c_asked)
        critic, generator_loss, realism = self.condition_critic.losses(x, cat, num, generated, asked, generator)
        out = {**out, "critic": (critic, 1.0), "critic_generator": (generator_loss, m.critic_weight)}
        if realism is not None:
            out["critic_realism"] = (realism, m.critic_realism_weight)
        return out

    def loss(self, images, reconstruction, mu, logvar, prior=None) -> dict[str, torch.Tensor]:
        """(1 − w)·rec + w·KL. mse (the paper's): pixel MSE and the KL per latent element, both mean-reduced.
        gaussian_nll: the Gaussian decoder's −log N(x; x̂, σ²) summed over pixels and KL(q(z | x) ‖ p(z | c)) summed
        over the latent, per image and averaged over the batch (w = ½: ½·(−ELBO), Kingma & Welling 2014, Eq. 10)."""
        w = self.cfg.model.kl_weight
        kl = kl_divergence(mu.flatten(1), logvar.flatten(1),
                           None if prior is None else tuple(t.flatten(1) for t in prior)).mean()
        if self.cfg.model.reconstruction == "gaussian_nll":
            rec = gaussian_nll(images.flatten(1), reconstruction.flatten(1), self.log_sigma).mean()
        else:
            rec = F.mse_loss(reconstruction, images)
            kl = kl / mu[0].numel()
        return {"loss": (1 - w) * rec + w * kl, "reconstruction": rec, "kl": kl}

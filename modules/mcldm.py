"""mcLDM: latent diffusion with masked conditions over a frozen AutoencoderKL first stage.

Training: DDPM's ε-prediction loss on cached first-stage latents (Ho et al. 2020, Eq. 14), the masked condition
embedding fed to the UNet at every level. Sampling: DDIM or ancestral DDPM from x_T, with classifier-free guidance
against the all-masked conditions, then the first-stage decoder.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import nn

from modules.base import ImageSampling, MaskedConditioningModule
from modules.conditioning import MaskedConditions
from modules.config import (ConditioningConfig, EvaluationConfig, LRSchedulerConfig, OptimizerConfig, SparsityConfig,
                            TrainerConfig, WandbConfig)
from modules.diffusion_components.diffusion import DiffusionConfig, GaussianDiffusion, epsilon_loss, guided
from modules.diffusion_components.first_stage import FirstStage, FirstStageConfig
from modules.diffusion_components.unet import LAYOUTS, UNetConfig, build_unet, downsampling_factor
from modules.image_data import ImageDataConfig
from modules.image_evaluation import SampleGridConfig
from modules.progress import bar


@dataclass
class SpeedConfig:
    channels_last: bool = True  # NHWC activations: faster convolutions on tensor cores
    # torch.compile the UNet (the first steps pay the compile time; worth it for long GPU runs, not for tests)
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    generation_batch_size: int = 64  # images denoised at once in evaluation and sampling


@dataclass
class SamplingConfig:
    """Numerics of sampling (validation grids, evaluate.py, sample.py); the sampler itself is diffusion.sampler."""
    precision: Literal["32", "bf16"] = "32"  # bf16 autocast of the UNet (GPUs); the updates and decoding stay fp32
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA while sampling


@dataclass
class MCLDMRunConfig:
    model_type: Literal["mcldm"]
    data: ImageDataConfig
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ema_decay: Optional[float] = 0.999  # EMA of the UNet and the condition embedding, used for sampling; null = off
    conditioning: ConditioningConfig = field(default_factory=lambda: ConditioningConfig(embedding_dim=5))
    sparsity: SparsityConfig = field(default_factory=lambda: SparsityConfig(initial=0.1, target=0.25))
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, betas=(0.9, 0.99),
                                                                               weight_decay=1e-6))
    lr_scheduler: LRSchedulerConfig = field(default_factory=lambda: LRSchedulerConfig(name="none"))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        max_epochs=200, batch_size=32, accumulate_grad_batches=2, precision="bf16-mixed"))
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    sample_grid: SampleGridConfig = field(default_factory=SampleGridConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def check_mcldm_config(cfg: MCLDMRunConfig, source: str) -> None:
    """Ranges of the mcLDM sections (the first stage's own checks included)."""
    from modules.diffusion_components.first_stage import check_first_stage_config
    from modules.image_evaluation import check_sample_grid
    from modules.training import require

    u, d = cfg.unet, cfg.diffusion
    require(u.layout in LAYOUTS, source, "unet.layout", f"one of {', '.join(LAYOUTS)}", u.layout)
    for key in ("start_channels", "blocks_per_level", "attention_heads", "attention_head_dim", "condition_channels",
                "time_embedding_dim", "positional_dim", "norm_groups"):
        require(getattr(u, key) >= 1, source, f"unet.{key}", "≥ 1", getattr(u, key))
    require(len(u.channel_mult) >= 1 and all(m >= 1 for m in u.channel_mult), source, "unet.channel_mult",
            "a non-empty list of integers ≥ 1", u.channel_mult)
    require(all(0 <= level < len(u.channel_mult) for level in u.attention_levels), source, "unet.attention_levels",
            f"levels in [0, {len(u.channel_mult) - 1}]", u.attention_levels)
    require(u.positional_dim % 2 == 0, source, "unet.positional_dim", "even (sine and cosine pairs)", u.positional_dim)
    require(0 <= u.dropout < 1, source, "unet.dropout", "in [0, 1)", u.dropout)
    require(d.timesteps >= 2, source, "diffusion.timesteps", "≥ 2", d.timesteps)
    require(0 < d.beta_start < d.beta_end < 1, source, "diffusion.beta_start/beta_end", "0 < start < end < 1",
            [d.beta_start, d.beta_end])
    require(0 <= d.drop_all_conditions <= 1, source, "diffusion.drop_all_conditions", "in [0, 1]",
            d.drop_all_conditions)
    require(1 <= d.sampling_steps <= d.timesteps, source, "diffusion.sampling_steps", f"in [1, {d.timesteps}]",
            d.sampling_steps)
    require(0 <= d.eta <= 1, source, "diffusion.eta", "in [0, 1]", d.eta)
    require(d.cfg_scale >= 0, source, "diffusion.cfg_scale", "≥ 0", d.cfg_scale)
    require(cfg.ema_decay is None or 0 < cfg.ema_decay < 1, source, "ema_decay", "in (0, 1) or null", cfg.ema_decay)
    require(cfg.speed.generation_batch_size >= 1, source, "speed.generation_batch_size", "≥ 1",
            cfg.speed.generation_batch_size)
    require(cfg.data.value_range == "minus_one_one", source, "data.value_range",
            "minus_one_one (the first stage works on images in [-1, 1])", cfg.data.value_range)
    check_first_stage_config(cfg.first_stage, source)
    check_sample_grid(cfg, source)


def check_latent_fits_unet(latent_shape: tuple[int, int, int], cfg: MCLDMRunConfig, source: str) -> None:
    """The UNet halves the latent's sides (levels times in the paper layout): they must divide by that factor."""
    from modules.errors import UserError

    factor = downsampling_factor(cfg.unet)
    _, h, w = latent_shape
    if h % factor or w % factor:
        raise UserError(f"{source}: data.image_size = {cfg.data.image_size} gives {h}×{w} latents, which the UNet "
                        f"({cfg.unet.layout} layout, {len(cfg.unet.channel_mult)} levels) halves "
                        f"{int(math.log2(factor))} times: the latent sides must be multiples of {factor}. Change "
                        "data.image_size or unet.channel_mult.")


def upgrade_checkpoint_config(config: dict) -> dict:
    """Checkpoints written before `unet.layout` existed hold the per-block-attention UNet with ≤ 8 GroupNorm groups."""
    unet = config.get("unet")
    if isinstance(unet, dict) and "layout" not in unet:
        config = {**config, "unet": {**unet, "layout": "per_block_attention", "norm_groups": 8}}
    return config


@dataclass
class SamplingOptions:
    """How `generate` samples; evaluate.py and sample.py override the config's defaults."""
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    cfg_scale: float = 0.0
    precision: str = "32"  # "bf16": the UNet under bf16 autocast


class MCLDM(ImageSampling, MaskedConditioningModule):
    """ε_θ(x_t, t, c) over first-stage latents; `generate` samples latents and decodes them with the first stage."""

    config_cls = MCLDMRunConfig
    model_type = "mcldm"

    def __init__(self, *, config: dict, schema: dict, latent_shape: tuple[int, int, int],
                 first_stage_fingerprint: Optional[str] = None, split_digest: Optional[str] = None):
        config = upgrade_checkpoint_config(config)
        super().__init__(config=config, schema=schema)
        self.save_hyperparameters()
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.unet = build_unet(self.cfg.unet, in_channels=self.latent_shape[0], condition_dim=self.embedding.out_dim)
        if self.cfg.speed.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.diffusion = GaussianDiffusion(self.cfg.diffusion)
        d = self.cfg.diffusion
        self.sampling = SamplingOptions(d.sampler, d.sampling_steps, d.eta, d.cfg_scale, self.cfg.sampling.precision)
        self._first_stage: list[FirstStage] = []  # a list: not a submodule, so never in the checkpoint
        self._compiled: dict[str, nn.Module] = {}  # torch.compile'd UNets (not submodules: not in the checkpoint)
        self.enable_ema(self.cfg.ema_decay)

    def generative_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"embedding": self.embedding, "unet": self.unet})

    # ------------------------------------------------------------------ first stage
    def attach_first_stage(self, first_stage: FirstStage) -> None:
        """Use this (frozen) first stage for decoding; refused when it is not the one the latents came from."""
        from modules.errors import UserError

        stored = self.hparams.get("first_stage_fingerprint")
        if stored is not None and first_stage.fingerprint() != stored:
            raise UserError("the first stage named in first_stage (config) is not the one this model was trained on "
                            f"(fingerprint {first_stage.fingerprint()} ≠ {stored}): its latents would not match. "
                            "Point first_stage.pretrained at the autoencoder used for training.")
        self._first_stage = [first_stage]

    def first_stage(self) -> FirstStage:
        if not self._first_stage:
            self.attach_first_stage(FirstStage.from_config(self.cfg.first_stage, source="the checkpoint's config"))
        fs = self._first_stage[0]
        if fs.device != self.device:
            fs.to(self.device)
        return fs

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1] with the data's channel count."""
        return self.first_stage().decode(latents, self.cfg.data.channels)

    @torch.no_grad()
    def evaluation_target(self, images: torch.Tensor) -> torch.Tensor:
        """The decoded ground truth D(E(x)): what a perfect latent model could reach (errors of the first stage
        itself are not the diffusion model's)."""
        fs, out = self.first_stage(), []
        step = self.cfg.speed.generation_batch_size
        for start in bar(range(0, len(images), step), desc="first-stage ground truth D(E(x))", unit="batch"):
            out.append(self.decode_latents(fs.encode(images[start:start + step])))
        return torch.cat(out)

    # ------------------------------------------------------------------ training
    def denoiser(self, averaged: bool = False) -> nn.Module:
        """The UNet, or with `averaged` the one sampling uses (the EMA copy when there is one); compiled once each
        when `speed.compile`."""
        unet = self.ema.shadow["unet"] if averaged and self.ema is not None else self.unet
        if not self.cfg.speed.compile:
            return unet
        key = "averaged" if unet is not self.unet else "live"
        if key not in self._compiled:
            self._compiled[key] = torch.compile(unet, mode=self.cfg.speed.compile_mode)
        return self._compiled[key]

    def _step(self, batch, p: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        latents, cat, num = batch
        conditions = self.mask(cat, num, p, generator, drop_all=self.cfg.diffusion.drop_all_conditions)
        t = self.diffusion.random_timesteps(len(latents), generator, latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        x_t = self.diffusion.q_sample(latents, t, noise)
        if self.cfg.speed.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        eps = self.denoiser()(x_t, t, self.embedding(conditions))
        return {"loss": epsilon_loss(eps, noise, self.cfg.diffusion.loss)}

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_latents(self, conditions: MaskedConditions, z: Optional[torch.Tensor] = None,
                         generator: Optional[torch.Generator] = None, *, progress: bool = False) -> torch.Tensor:
        """Latents sampled from x_T = z (or fresh noise) with the conditions (and their masks) fixed for the whole
        run and classifier-free guidance against all conditions masked; the EMA weights when the model keeps
        them."""
        parts = self.ema.shadow if self.ema is not None else self.generative_modules()
        unet, s = self.denoiser(averaged=True), self.sampling
        n = len(conditions)
        if z is None:
            z = torch.randn((n, *self.latent_shape), generator=generator, device=self.device)
        out = []
        step = self.cfg.speed.generation_batch_size
        with self._sampling_numerics():
            for start in range(0, n, step):
                chunk = conditions.rows(start, start + step)
                c = parts["embedding"](chunk)
                u = parts["embedding"](self.masking.mask_all(len(chunk), device=self.device))
                predict = guided(self._unet_call(unet), c, u, s.cfg_scale)
                x_T = z[start:start + step].to(self.device)
                out.append(self.diffusion.sample(predict, tuple(x_T.shape), sampler=s.sampler, steps=s.steps,
                                                 eta=s.eta, generator=generator, noise=x_T, device=self.device,
                                                 progress=progress))
        return torch.cat(out)

    def _unet_call(self, unet: nn.Module):
        """The UNet as sampling calls it: channels_last input when the model is, bf16 autocast with
        `sampling.precision: bf16`."""
        channels_last, bf16 = self.cfg.speed.channels_last, self.sampling.precision == "bf16"
        device_type = self.device.type

        def call(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                return unet(x, t, c)

        return call

    @contextlib.contextmanager
    def _sampling_numerics(self):
        """TF32 on CUDA while sampling (`sampling.tf32`), the previous settings restored afterwards."""
        if self.device.type != "cuda" or not self.cfg.sampling.tf32:
            yield
            return
        previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous

    @torch.no_grad()
    def generate(self, conditions: MaskedConditions, z: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] decoded from `generate_latents` (z: the initial noise x_T, latent-shaped)."""
        latents = self.generate_latents(conditions, z, generator)
        step = self.cfg.speed.generation_batch_size
        return torch.cat([self.decode_latents(latents[s:s + step]) for s in range(0, len(latents), step)])


    def set_sampling(self, *, sampler: Optional[str] = None, steps: Optional[int] = None, eta: Optional[float] = None,
                     cfg_scale: Optional[float] = None, precision: Optional[str] = None) -> None:
        """Override the config's sampler, number of steps, DDIM η, guidance scale and UNet precision (None keeps
        the setting)."""
        from modules.diffusion_components.diffusion import SAMPLERS
        from modules.errors import UserError

        s, T = self.sampling, self.cfg.diffusion.timesteps
        if sampler is not None:
            if sampler not in SAMPLERS:
                raise UserError(f"--sampler {sampler!r} is not a sampler; choose one of {', '.join(SAMPLERS)}.")
            s.sampler = sampler
        if steps is not None:
            if not 1 <= steps <= T:
                raise UserError(f"--steps must lie in [1, {T}] (the model's diffusion.timesteps), got {steps}.")
            s.steps = steps
        elif s.sampler == "ddpm" and sampler is not None:
            s.steps = T  # ancestral DDPM: every step unless asked otherwise
        if eta is not None:
            if not 0 <= eta <= 1:
                raise UserError(f"--eta must lie in [0, 1], got {eta}.")
            s.eta = eta
        if cfg_scale is not None:
            if cfg_scale < 0:
                raise UserError(f"--cfg_scale must be ≥ 0 (0 = no guidance), got {cfg_scale}.")
            s.cfg_scale = cfg_scale
        if precision is not None:
            if precision not in ("32", "bf16"):
                raise UserError(f"--sampling_precision must be 32 or bf16, got {precision!r}.")
            s.precision = precision

"""Gaussian diffusion in latent space: noise schedules, the ε-prediction loss, DDPM/DDIM sampling with
classifier-free guidance computed in one batched forward pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

# our names → diffusers' `beta_schedule` names (the schedules themselves are diffusers')
BETA_SCHEDULES = {"linear": "linear", "quadratic": "scaled_linear", "sigmoid": "sigmoid", "cosine": "squaredcos_cap_v2"}


@dataclass
class DiffusionConfig:
    timesteps: int = 1000  # T
    beta_schedule: Literal["linear", "quadratic", "sigmoid", "cosine"] = "linear"
    beta_start: float = 1e-4  # β_1 (linear, quadratic, sigmoid)
    beta_end: float = 0.02  # β_T
    loss: Literal["l2", "l1", "huber"] = "l2"  # on ε
    # probability that a training example sees every condition masked (on top of the sparsity), so the
    # unconditional branch of classifier-free guidance is learned (Ho & Salimans 2022, Sec. 3.2)
    drop_all_conditions: float = 0.1
    sampler: Literal["ddim", "ddpm"] = "ddim"  # default for validation grids, evaluate.py and sample.py
    sampling_steps: int = 50
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 DDPM-like
    cfg_scale: float = 0.0  # w in ε = (1 + w)·ε_cond − w·ε_uncond; 0 = no guidance (one forward pass)


def beta_schedule(name: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """β_1…β_T (float32) of the named schedule, as diffusers computes it; cosine is Nichol & Dhariwal 2021, Eq. 17."""
    from diffusers import DDPMScheduler

    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    scheduler = DDPMScheduler(num_train_timesteps=timesteps, beta_start=beta_start, beta_end=beta_end,
                              beta_schedule=BETA_SCHEDULES[name])
    return scheduler.betas.to(torch.float32)


def sampling_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps from T−1 down to 0, evenly spaced ("linspace" spacing): sampling starts at pure noise
    and its last step is t = 0."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"the number of sampling steps must lie in [1, {timesteps}], got {steps}")
    if steps == 1:
        return [timesteps - 1]
    return [round(i * (timesteps - 1) / (steps - 1)) for i in reversed(range(steps))]


def epsilon_loss(predicted: torch.Tensor, noise: torch.Tensor, kind: str) -> torch.Tensor:
    """Ho et al. 2020, Eq. 14 (L_simple) with an L2, L1 or Huber distance; mean over all elements."""
    predicted = predicted.float()
    if kind == "l2":
        return F.mse_loss(predicted, noise)
    if kind == "l1":
        return F.l1_loss(predicted, noise)
    return F.huber_loss(predicted, noise, delta=1.0)


class GaussianDiffusion(nn.Module):
    """The forward process q(x_t | x_0) and the reverse samplers; the schedule lives in (non-persistent) buffers on
    the model's device, so a sampling step makes no host round trips."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.cfg = cfg
        self.timesteps = cfg.timesteps
        betas = beta_schedule(cfg.beta_schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end).double()
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt().float(), persistent=False)

    @staticmethod
    def _per_sample(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return values.index_select(0, t).reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε (Ho et al. 2020, Eq. 4)."""
        return (self._per_sample(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + self._per_sample(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def random_timesteps(self, n: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
        return torch.randint(0, self.timesteps, (n,), generator=generator, device=device)

    def _step_coefficients(self, steps: list[int], eta: float) -> torch.Tensor:
        """Per sampling step (rows): √ᾱ_t, √(1−ᾱ_t), √ᾱ_prev, the ε coefficient √(1−ᾱ_prev−σ²) and σ, with
        ᾱ_prev = 1 after the last step (Song et al. 2021, Eq. 12)."""
        a = self.alphas_cumprod.double()
        t = torch.tensor(steps, device=a.device)
        a_t = a[t]
        a_prev = torch.cat([a[t[1:]], torch.ones(1, dtype=a.dtype, device=a.device)])
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        direction = (1 - a_prev - sigma ** 2).clamp(min=0).sqrt()
        return torch.stack([a_t.sqrt(), (1 - a_t).sqrt(), a_prev.sqrt(), direction, sigma], dim=1).float()

    @torch.no_grad()
    def sample(self, predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...], *,
               sampler: str = "ddim", steps: Optional[int] = None, eta: Optional[float] = None,
               generator: Optional[torch.Generator] = None, device=None, noise: Optional[torch.Tensor] = None,
               timesteps: Optional[list[int]] = None, progress: bool = False) -> torch.Tensor:
        """x_0 from x_T ~ N(0, I) by DDIM (Song et al. 2021, Eq. 12) or ancestral DDPM (Ho et al. 2020, Alg. 2).

        DDPM is the η = 1 case of the same update: with all T steps it is exactly Alg. 2 with σ_t² = β̃_t; with
        fewer steps it is DDPM on the respaced schedule. `predict_noise(x_t, t)` returns ε̂ (guided or not);
        `timesteps` (descending) replaces the evenly spaced schedule.
        """
        device = device or self.alphas_cumprod.device
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}; choose ddim or ddpm")
        if sampler == "ddpm":
            steps, eta = steps or self.timesteps, 1.0
        else:
            steps = steps or self.cfg.sampling_steps
            eta = self.cfg.eta if eta is None else eta
        schedule = list(timesteps) if timesteps is not None else sampling_timesteps(self.timesteps, steps)
        coefficients = self._step_coefficients(schedule, eta).to(device)
        x = noise.to(device) if noise is not None else torch.randn(shape, generator=generator, device=device)
        t_batch = torch.tensor(schedule, device=device, dtype=torch.long)[:, None].expand(-1, shape[0])
        iterator = range(len(schedule))
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc=f"{sampler} sampling", unit="step", leave=False)
        for i in iterator:
            sqrt_a, sqrt_1ma, sqrt_a_prev, direction, sigma = coefficients[i]
            eps = predict_noise(x, t_batch[i]).float()
            x0 = (x - sqrt_1ma * eps) / sqrt_a
            x = sqrt_a_prev * x0 + direction * eps
            if eta > 0 and i < len(schedule) - 1:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=device)
        return x


def guided(model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], condition: torch.Tensor,
           unconditional: torch.Tensor, cfg_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """ε̂(x, t) with classifier-free guidance, ε = (1 + w)·ε(x, c) − w·ε(x, ∅) (Ho & Salimans 2022, Eq. 6),
    both branches in one forward pass of a doubled batch; w = 0 is the plain conditional model (one pass)."""
    if cfg_scale == 0:
        return lambda x, t: model(x, t, condition)
    both = torch.cat([condition, unconditional])

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), both).float().chunk(2)
        return eps_cond + cfg_scale * (eps_cond - eps_uncond)

    return predict

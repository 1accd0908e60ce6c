"""Gaussian diffusion in latent space: noise schedules, the ε-prediction loss, and one sampling loop over diffusers'
schedulers (DDIM, DDPM, DPM-Solver++, UniPC, Euler) built from the model's own β schedule, with classifier-free
guidance computed in one batched forward pass."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from modules.progress import bar

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
    # default for validation grids, evaluate.py and sample.py; see SAMPLERS
    sampler: Literal["ddim", "ddpm", "dpm_solver", "unipc", "euler"] = "ddim"
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


# name → (diffusers class, its arguments); every one gets the model's betas and "trailing" spacing: the first step
# at t = T − 1 (pure noise), then every T/steps (Lin et al. 2024, Sec. 3.3). diffusers' DDIM steps from t to
# t − T // steps, which is the next sampled timestep with this spacing (with "linspace" it is not)
SAMPLERS: dict[str, tuple[str, dict]] = {
    # Song et al. 2021, Eq. 12; η from the call
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True)),
    # Ho et al. 2020, Alg. 2 with σ_t² = β̃_t; with fewer steps than T, DDPM on the respaced schedule
    "ddpm": ("DDPMScheduler", dict(clip_sample=False, variance_type="fixed_small")),
    # Lu et al. 2022 (DPM-Solver++), second-order multistep, first order at the last step
    "dpm_solver": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2,
                                                       lower_order_final=True)),
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=2)),  # Zhao et al. 2023, B(h) = e^h − 1 ("bh2")
    "euler": ("EulerDiscreteScheduler", dict()),  # Karras et al. 2022, Alg. 1 (no churn: deterministic)
}


def make_scheduler(sampler: str, betas: torch.Tensor, steps: int):
    """A fresh diffusers scheduler (the multistep ones keep state within a run) for `steps` sampling steps."""
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 1 <= steps <= len(betas):
        raise ValueError(f"the number of sampling steps must lie in [1, {len(betas)}], got {steps}")
    name, kwargs = SAMPLERS[sampler]
    scheduler = getattr(diffusers, name)(num_train_timesteps=len(betas), trained_betas=betas.double().numpy(),
                                         timestep_spacing="trailing", prediction_type="epsilon", **kwargs)
    scheduler.set_timesteps(steps)
    return scheduler


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
        self.betas = betas  # a CPU tensor, not a buffer: the samplers are built from it on the host
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

    @torch.no_grad()
    def sample(self, predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...], *,
               sampler: str = "ddim", steps: Optional[int] = None, eta: Optional[float] = None,
               generator: Optional[torch.Generator] = None, device=None, noise: Optional[torch.Tensor] = None,
               progress: bool = False) -> torch.Tensor:
        """x_0 from x_T = `noise` (or a fresh N(0, I) draw) with the diffusers scheduler `sampler` (SAMPLERS).

        The one sampling loop of the project: per step the model input (scaled where the sampler asks, Euler), ε̂
        from `predict_noise(x_t, t)` (guided or not: `guided`), then the scheduler's update; stochastic samplers
        (DDPM, DDIM with η > 0) draw their noise from `generator`. `steps` defaults to the config's, all T for
        DDPM; `eta` (DDIM only) to the config's. A bar over the steps is drawn with `progress`, or within an
        evaluation on a terminal (`modules.progress`).
        """
        device = device or self.alphas_cumprod.device
        if steps is None:
            steps = self.timesteps if sampler == "ddpm" else self.cfg.sampling_steps
        eta = self.cfg.eta if eta is None else eta
        scheduler = make_scheduler(sampler, self.betas, steps)
        x = noise.to(device) if noise is not None else torch.randn(shape, generator=generator, device=device)
        x = x.float() * scheduler.init_noise_sigma
        accepts = inspect.signature(scheduler.step).parameters
        extra = {"eta": eta} if sampler == "ddim" else {}
        if "generator" in accepts:  # the deterministic multistep solvers take none
            extra["generator"] = generator
        timesteps = scheduler.timesteps
        # `progress` draws the bar wherever stderr goes; otherwise it follows an evaluation's bars (modules.progress)
        iterator = bar(range(len(timesteps)), desc=f"{sampler} denoising ({shape[0]} latents)", unit="step",
                       shown=True if progress else None)
        t_batch = timesteps.to(device)[:, None].expand(-1, shape[0])  # one transfer, not one per step
        for i in iterator:
            t = timesteps[i]
            eps = predict_noise(scheduler.scale_model_input(x, t), t_batch[i]).float()
            x = scheduler.step(eps, t, x, **extra).prev_sample
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

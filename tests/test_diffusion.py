"""Noise schedules; the sampling loop against the papers' updates (DDIM Eq. 12 with η > 0 on a shared noise stream,
DDPM Alg. 2) and diffusers' own step; the fast samplers on a Gaussian whose exact ε is known; batched guidance."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from modules.diffusion_components.diffusion import (SAMPLERS, DiffusionConfig, GaussianDiffusion, beta_schedule,
                                                    guided, make_scheduler)


def toy_model(x, t, c):
    """A fixed, nonlinear ε̂(x, t, c) so sampling has something to follow."""
    return torch.tanh(0.3 * x + 0.001 * t.float().reshape(-1, 1, 1, 1) + c.reshape(len(c), -1, 1, 1)[:, :1])


@pytest.mark.parametrize("name", ["linear", "quadratic", "sigmoid", "cosine"])
def test_beta_schedules_are_increasing_and_bounded(name):
    betas = beta_schedule(name, 1000)
    assert betas.shape == (1000,)
    assert (betas > 0).all() and (betas < 1).all()
    assert (betas[1:] >= betas[:-1] - 1e-7).all()
    if name != "cosine":
        assert 1e-4 <= betas[0] < 2e-4 and betas[-1] == pytest.approx(0.02, rel=1e-2)
    alpha_bar = torch.cumprod(1 - betas.double(), 0)
    assert alpha_bar[-1] < 0.05  # x_T is (almost) pure noise


def test_q_sample_matches_closed_form():
    d = GaussianDiffusion(DiffusionConfig(timesteps=100))
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 50, 99])
    a = torch.cumprod(1 - beta_schedule("linear", 100).double(), 0)[t].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_starts_at_pure_noise_and_uses_the_model_betas(sampler):
    betas = beta_schedule("sigmoid", 1000)  # not diffusers' default schedule: the betas must be the model's
    scheduler = make_scheduler(sampler, betas, 20)
    assert len(scheduler.timesteps) == 20 and float(scheduler.timesteps[0]) == 999
    assert float(scheduler.timesteps[-1]) == 999 - 19 * 50  # trailing spacing, T/steps apart
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), torch.cumprod(1 - betas.double(), 0), atol=1e-6,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="sampling steps"):
        make_scheduler(sampler, betas, 1001)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("heun", betas, 10)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_is_song_et_al_eq_12_and_diffusers_step_on_a_shared_noise_stream(eta):
    T, steps = 200, 20
    d = GaussianDiffusion(DiffusionConfig(timesteps=T))
    c = torch.randn(2, 3)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = d.sample(lambda x, t: toy_model(x, t, c), noise.shape, sampler="ddim", steps=steps, eta=eta, noise=noise,
                    generator=torch.Generator().manual_seed(5))
    # Song et al. 2021, Eq. 12, written out; the noise of step i is the i-th draw of the same seeded stream
    a = torch.cumprod(1 - beta_schedule("linear", T).double(), 0)
    schedule = list(range(T - 1, -1, -T // steps))
    g, x = torch.Generator().manual_seed(5), noise.double()
    draws = []
    for i, t in enumerate(schedule):
        a_t = a[t]
        a_prev = a[schedule[i + 1]] if i + 1 < len(schedule) else torch.tensor(1.0, dtype=torch.float64)
        eps = toy_model(x.float(), torch.full((2,), t), c).double()
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        z = torch.randn(x.shape, generator=g) if eta > 0 else torch.zeros(x.shape)
        draws.append(z)
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps + sigma * z.double()
    torch.testing.assert_close(ours, x.float(), atol=2e-4, rtol=2e-4)
    # diffusers' DDIMScheduler.step fed the same draws as variance_noise
    ref = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    ref.set_timesteps(steps)
    assert [int(t) for t in ref.timesteps] == schedule
    x = noise.clone()
    for t, z in zip(ref.timesteps, draws):
        x = ref.step(toy_model(x, t.repeat(2), c), t, x, eta=eta, variance_noise=z).prev_sample
    torch.testing.assert_close(ours, x, atol=2e-4, rtol=2e-4)


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_not():
    d = GaussianDiffusion(DiffusionConfig(timesteps=100))
    c = torch.randn(2, 3)
    run = lambda eta, seed: d.sample(lambda x, t: toy_model(x, t, c), (2, 2, 4, 4), steps=10, eta=eta,
                                     generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(run(0.0, 1), run(0.0, 1))
    torch.testing.assert_close(run(1.0, 1), run(1.0, 1))  # seeded
    noise = torch.randn(2, 2, 4, 4)
    a = d.sample(lambda x, t: toy_model(x, t, c), noise.shape, steps=10, eta=0.0, noise=noise,
                 generator=torch.Generator().manual_seed(1))
    b = d.sample(lambda x, t: toy_model(x, t, c), noise.shape, steps=10, eta=0.0, noise=noise,
                 generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)  # η = 0: the result depends on x_T only
    a1 = d.sample(lambda x, t: toy_model(x, t, c), noise.shape, steps=10, eta=1.0, noise=noise,
                  generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, a1)


def test_ddpm_with_all_steps_is_ho_et_al_algorithm_2():
    T = 30
    d = GaussianDiffusion(DiffusionConfig(timesteps=T))
    c = torch.randn(2, 3)
    noise = torch.randn(2, 2, 4, 4)
    g = torch.Generator().manual_seed(3)
    ours = d.sample(lambda x, t: toy_model(x, t, c), noise.shape, sampler="ddpm", noise=noise, generator=g)
    # reference: diffusers' DDPMScheduler (posterior variance β̃_t), with the same z draws
    ref = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        clip_sample=False, variance_type="fixed_small")
    ref.set_timesteps(T)  # only its ᾱ and timesteps are used: the update below is Alg. 2 written out
    g = torch.Generator().manual_seed(3)
    x = noise.clone()
    for t in ref.timesteps:
        eps = toy_model(x, t.repeat(2), c)
        a_bar = ref.alphas_cumprod[t]
        a_prev = ref.alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0)
        x0 = (x - (1 - a_bar).sqrt() * eps) / a_bar.sqrt()
        beta_t = 1 - a_bar / a_prev
        mean = (a_prev.sqrt() * beta_t / (1 - a_bar)) * x0 + ((1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_bar)) * x
        if t > 0:
            mean = mean + ((1 - a_prev) / (1 - a_bar) * beta_t).sqrt() * torch.randn(x.shape, generator=g)
        x = mean
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_batched_guidance_equals_two_passes():
    calls = []

    def model(x, t, c):
        calls.append(len(x))
        return toy_model(x, t, c)

    c, u = torch.randn(4, 3), torch.zeros(4, 3)
    x, t = torch.randn(4, 2, 4, 4), torch.full((4,), 7)
    w = 2.5
    out = guided(model, c, u, w)(x, t)
    assert calls == [8]  # one forward pass of the doubled batch
    expected = (1 + w) * toy_model(x, t, c) - w * toy_model(x, t, u)
    torch.testing.assert_close(out, expected)
    calls.clear()
    torch.testing.assert_close(guided(model, c, u, 0.0)(x, t), toy_model(x, t, c))
    assert calls == [4]


def gaussian_data_epsilon(mu: float, s0: float, alphas_cumprod: torch.Tensor):
    """The exact ε̂(x_t, t) = E[ε | x_t] for data x_0 ~ N(mu, s0²): a network that has learned it perfectly."""

    def predict(x, t):
        a = alphas_cumprod.double().index_select(0, t.round().long()).reshape(-1, *([1] * (x.ndim - 1)))
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * s0 ** 2 + 1 - a)).float()

    return predict


def test_fast_samplers_reach_the_data_distribution_in_few_steps():
    """With the exact ε of Gaussian data every deterministic sampler maps x_T to N(mu, s0²); in 20 steps
    DPM-Solver++ and UniPC come 5× closer to the 1000-step DDIM solution than DDIM (and Euler, its σ-space twin)."""
    T, mu, s0 = 1000, 1.5, 1.0
    d = GaussianDiffusion(DiffusionConfig(timesteps=T))
    predict = gaussian_data_epsilon(mu, s0, d.alphas_cumprod)
    noise = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    run = lambda sampler, steps: d.sample(predict, noise.shape, sampler=sampler, steps=steps, eta=0.0, noise=noise)
    reference = run("ddim", 1000)
    assert abs(reference.mean() - mu) < 0.05 and abs(reference.std() - s0) < 0.05
    errors = {name: (run(name, 20) - reference).abs().max().item() for name in ("ddim", "dpm_solver", "unipc", "euler")}
    assert errors["euler"] == pytest.approx(errors["ddim"], rel=0.01), errors
    for name in ("dpm_solver", "unipc"):
        assert errors[name] < errors["ddim"] / 5, errors
        out = run(name, 20)
        assert abs(out.mean() - mu) < 0.05 and abs(out.std() - s0) < 0.05, name

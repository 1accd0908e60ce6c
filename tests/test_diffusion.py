"""Noise schedules, DDIM/DDPM sampling against diffusers' schedulers, and batched classifier-free guidance."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from modules.diffusion_components.diffusion import (DiffusionConfig, GaussianDiffusion, beta_schedule, guided,
                                                    sampling_timesteps)


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


def test_sampling_timesteps_start_at_noise_and_end_at_zero():
    assert sampling_timesteps(1000, 50)[0] == 999 and sampling_timesteps(1000, 50)[-1] == 0
    assert len(set(sampling_timesteps(1000, 50))) == 50
    assert sampling_timesteps(10, 10) == list(range(9, -1, -1))
    with pytest.raises(ValueError, match="sampling steps"):
        sampling_timesteps(10, 11)


def test_ddim_equals_diffusers_ddim_scheduler():
    cfg = DiffusionConfig(timesteps=200, beta_schedule="linear")
    d = GaussianDiffusion(cfg)
    c = torch.randn(2, 3)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    # diffusers steps from t to t − T/steps, which is the next sampled timestep only for "leading" spacing
    ref = DDIMScheduler(num_train_timesteps=200, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        timestep_spacing="leading", set_alpha_to_one=True, clip_sample=False)
    ref.set_timesteps(20)
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(toy_model(x, t.repeat(2), c), t, x, eta=0.0).prev_sample
    schedule = [int(t) for t in ref.timesteps]
    assert schedule[-1] == 0
    ours = d.sample(lambda x, t: toy_model(x, t, c), noise.shape, sampler="ddim", eta=0.0, noise=noise,
                    timesteps=schedule)
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


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
    ref.set_timesteps(T)
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

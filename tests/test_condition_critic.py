"""The condition critic of the conv-mcVAE: its losses written out (cross-entropy, 1 − R², the balanced weights, the
GAN term), where its gradients go, and the wiring of the critic branch (z from the prior of the rows' conditions)."""
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from modules.conditioning import ConditionSchema, MaskedConditions
from modules.condition_critic import ConditionCritic
from modules.config import ConditionSpec
from tests.test_conv_mcvae import FRAME, GENERATIVE, SPECS, build


def schema_and_conditions():
    schema = ConditionSchema.fit(SPECS, FRAME)  # style: BMX, MTB, ROAD (+ mask token 3); teeth: numerical
    return schema, *schema.encode(FRAME)


def test_the_losses_are_the_written_out_cross_entropy_and_one_minus_r2_on_the_rows_they_name():
    torch.manual_seed(0)
    schema, cat, num = schema_and_conditions()
    critic = ConditionCritic(1, schema, width=4, image_size=16)
    real, generated = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16, requires_grad=True)
    # what the generated images were asked for: row 1's style masked, row 3's teeth masked (row 2's is missing)
    asked_cat = cat.clone()
    asked_cat[1, 0] = 3
    asked_num = num.clone()
    numerical_mask = torch.isnan(num).clone()
    numerical_mask[3, 0] = True
    asked = MaskedConditions(asked_cat, torch.where(numerical_mask, torch.full_like(num, -1.0), num), numerical_mask)
    critic_loss, generator_loss, realism = critic.losses(real, cat, num, generated, asked)
    assert realism is None

    def expected(out, rows_cat, rows_num, targets_cat, targets_num):
        ce = F.cross_entropy(out[rows_cat, :3], targets_cat[rows_cat, 0])
        t = targets_num[rows_num, 0]
        return ce + ((out[rows_num, 3] - t) ** 2).mean() / t.var()

    with torch.no_grad():
        on_real, on_generated = critic(real), critic(generated)
    everything, known_teeth = torch.ones(4, dtype=torch.bool), ~torch.isnan(num[:, 0])
    assert critic_loss.item() == pytest.approx(expected(on_real, everything, known_teeth, cat, num).item(), rel=1e-5)
    visible_style = torch.tensor([True, False, True, True])
    visible_teeth = torch.tensor([True, True, False, False])
    assert generator_loss.item() == pytest.approx(
        expected(on_generated, visible_style, visible_teeth, asked_cat, asked_num).item(), rel=1e-5)

    # gradients: the critic learns from the real images only, the generator from the frozen critic only
    generator_loss.backward(retain_graph=True)
    assert generated.grad is not None and generated.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.parameters())
    critic_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())


def test_the_critic_downsamples_to_an_8x8_grid_at_every_size():
    schema, _, _ = schema_and_conditions()
    for size, convs in ((16, 1), (64, 3), (256, 5)):
        critic = ConditionCritic(1, schema, width=4, image_size=size)
        assert critic.features(torch.zeros(1, 1, size, size)).shape[-1] == 8
        assert sum(isinstance(m, torch.nn.Conv2d) for m in critic.features) == convs
        assert critic(torch.zeros(2, 1, size, size)).shape == (2, 3 + 1)


def test_the_critic_branch_decodes_z_from_the_prior_of_the_asked_conditions():
    """The generator term must judge images decoded from z ~ p(z | c) with the rows' masked conditions c, not from
    the posterior or N(0, I), against the conditions that were visible."""
    torch.manual_seed(0)
    model, schema = build(16, levels=2, attention_levels=[], dropout=0.0, critic_weight=10.0, critic_batch=3,
                          critic_width=4, **GENERATIVE)
    torch.nn.init.normal_(model.prior_net[-1].weight, std=0.5)  # a prior that depends on c
    cat, num = schema.encode(FRAME)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    masked = model.mask(cat, num, 0.0)
    c = model.embed(masked)
    z = torch.zeros(4, *model.latent_shape)
    g = torch.Generator().manual_seed(5)
    out = model.auxiliary_losses(images, cat, num, masked, c, z, g)
    assert set(out) == {"critic", "critic_generator"} and out["critic_generator"][1] == 10.0
    # the same draws written out: ε, then the prior of the first rows' conditions
    g = torch.Generator().manual_seed(5)
    asked = masked.rows(0, 3)
    eps = torch.randn((3, *model.latent_shape), generator=g)
    c_asked = model.embed(asked)
    mu, logvar = model.prior(c_asked)
    generated = model.decode(mu + eps * torch.exp(0.5 * logvar), c_asked)
    critic, generator_loss, _ = model.condition_critic.losses(images, cat, num, generated, asked)
    assert out["critic"][0].item() == pytest.approx(critic.item(), rel=1e-6)
    assert out["critic_generator"][0].item() == pytest.approx(generator_loss.item(), rel=1e-6)
    # and the step adds weight × that term to the VAE loss, logging both (one generator stream: masks, the
    # posterior's ε, then the critic branch)
    step = model._step((images, cat, num), 0.2, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    masked = model.mask(cat, num, 0.2, g)
    c = model.embed(masked)
    reconstruction, mu, logvar, z = model._reconstruct(images, c, g)
    vae = model.loss(images, reconstruction, mu, logvar, model.prior(c))["loss"]
    extra = model.auxiliary_losses(images, cat, num, masked, c, z, g)
    assert step["critic_generator"].item() == pytest.approx(extra["critic_generator"][0].item(), rel=1e-6)
    total = vae + extra["critic"][0] + 10.0 * extra["critic_generator"][0]
    assert step["loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_a_model_without_critic_has_no_critic_terms():
    model, schema = build(16, levels=2, attention_levels=[], **GENERATIVE)
    assert model.condition_critic is None
    out = model._step((torch.rand(4, 1, 16, 16), *schema.encode(FRAME)), 0.1, torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "reconstruction", "kl"}


def test_realism_is_the_non_saturating_gan_loss_and_balance_weighs_rare_categories_up():
    torch.manual_seed(0)
    schema, cat, num = schema_and_conditions()
    critic = ConditionCritic(1, schema, width=4, image_size=16, realism=True, balance=1.0)
    real, generated = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16, requires_grad=True)
    asked = MaskedConditions(cat, torch.nan_to_num(num, nan=-1.0), torch.isnan(num))
    # counts grow in training only, by the known categories of the real batch (ROAD, MTB, ROAD, BMX)
    critic.eval()
    critic.losses(real, cat, num, generated, asked)
    assert critic.category_counts.sum() == 0
    critic.train()
    critic.category_counts.copy_(torch.tensor([1.0, 1.0, 6.0]))  # BMX, MTB, ROAD seen so far
    critic_loss, generator_loss, realism = critic.losses(real, cat, num, generated, asked)
    assert critic.category_counts.tolist() == [2.0, 2.0, 8.0]
    with torch.no_grad():
        on_real, on_generated = critic(real), critic(generated)
    plain = ConditionCritic.condition_loss(critic, on_real, cat, num, cat != 3, ~torch.isnan(num))
    gan = F.softplus(-on_real[:, -1]).mean() + F.softplus(on_generated[:, -1]).mean()
    assert critic_loss.item() == pytest.approx((plain + gan).item(), rel=1e-5)
    assert realism.item() == pytest.approx(F.softplus(-on_generated[:, -1]).mean().item(), rel=1e-5)
    frequency = torch.tensor([2.0, 2.0, 8.0]) / 12
    weight = 1 / frequency[cat[:, 0]]
    ce = F.cross_entropy(on_generated[:, :3], cat[:, 0], reduction="none")
    known = ~torch.isnan(num[:, 0])
    t = num[known, 0]
    teeth = ((on_generated[known, 3] - t) ** 2).mean() / t.var()
    assert generator_loss.item() == pytest.approx(((ce * weight).mean() / weight.mean() + teeth).item(), rel=1e-5)
    # the generator's GAN term reaches the images, not the critic
    realism.backward()
    assert generated.grad.abs().sum() > 0 and all(p.grad is None for p in critic.parameters())


def test_shift_translates_every_image_by_its_own_whole_pixel_draw_real_and_generated_alike():
    """DiffAugment's translation: each image moves by its own (dy, dx) ∈ [−k, k]², drawn from the step's generator;
    the gap repeats the edge; the gradient reaches the generated images; evaluation sees them unshifted."""
    schema, cat, num = schema_and_conditions()
    critic = ConditionCritic(1, schema, width=4, image_size=16, shift=0.125)  # k = 2 px
    assert critic.max_shift == 2
    dots = torch.full((4, 1, 16, 16), -1.0)
    dots[:, 0, 0, :] = 0.5  # a top edge row, repeated into the gap when an image moves down
    dots[:, 0, 6, 8] = 1.0
    moved = critic.augment(dots, torch.Generator().manual_seed(1))
    shifts = torch.randint(-2, 3, (4, 2), generator=torch.Generator().manual_seed(1))
    assert {dy > 0 for dy, _ in shifts.tolist()} == {True, False}  # images move up and down
    for image, (dy, dx) in zip(moved, shifts.tolist()):
        assert (image[0] == 1.0).nonzero().tolist() == [[6 + dy, 8 + dx]]
        # the edge row moved down by dy and copied into the gap above it, or moved out of the image
        edge = (image[0] == 0.5).all(dim=1)
        assert edge.tolist() == [i <= dy for i in range(16)]
        assert ((image[0] == 0.5).sum(dim=1) % 16 == 0).all()  # no row is partly edge
    # the losses judge the shifted images: the real ones with the first draw, the generated with the next
    asked = MaskedConditions(cat, torch.nan_to_num(num, nan=-1.0), torch.isnan(num))
    generated = torch.randn(4, 1, 16, 16, requires_grad=True)
    real = torch.randn(4, 1, 16, 16)
    critic_loss, generator_loss, _ = critic.losses(real, cat, num, generated, asked, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        on_real = critic(critic.augment(real, g))
        on_generated = critic(critic.augment(generated, g))
        unshifted = critic(generated)
    known = cat != 3, ~torch.isnan(num)
    assert critic_loss.item() == pytest.approx(critic.condition_loss(on_real, cat, num, *known).item(), rel=1e-6)
    assert generator_loss.item() == pytest.approx(
        critic.condition_loss(on_generated, cat, num, *known).item(), rel=1e-6)
    assert generator_loss.item() != pytest.approx(critic.condition_loss(unshifted, cat, num, *known).item(), rel=1e-3)
    generator_loss.backward()
    assert generated.grad.abs().sum() > 0
    critic.eval()
    _, in_eval, _ = critic.losses(real, cat, num, generated, asked, torch.Generator().manual_seed(7))
    assert in_eval.item() == pytest.approx(critic.condition_loss(unshifted, cat, num, *known).item(), rel=1e-6)

"""A condition critic for image VAEs: images decoded from z ~ p(z | c) must show their visible conditions to a
small CNN that learns the conditions from the real training images of the same step (the auxiliary classifier of
AC-GAN, Odena et al. 2017; its real/fake head is optional, `realism`).

Why: under the ELBO the decoder reads the conditions from z, where the encoder always writes them, and hardly
from c, which training masks a share of the time. Samples decode z ~ p(z | c), whose diagonal Gaussian carries
little of that detail, so they showed the majority fork whatever was asked (benchmarks/RESULTS.md, "conv-mcVAE
ablation"). The critic's gradient reaches the decoder and the prior through the sampled images only.

Its class head learns on real images only, so the decoder can find textures that it reads as a category (an
adversarial example). With the GAN term (`realism`) the samples of rare prompts (fork type 1 asked for alone)
turned to speckle, the more so the larger its weight; without it they stay clean. Rare categories asked for
show more often in every run, at a cost in image quality (benchmarks/RESULTS.md, "conv-mcVAE ablation 2"). The
nearest-image adherence of the evaluation is the check no texture can pass. `conv_mcvae_biked_small` and
`conv_mcvae_biked` ship the critic with `shift` ("conv-mcVAE ablation 4"); `conv_mcvae_biked_paper` has none.

A small critic fits the training images' conditions and stops generalising (its loss on real validation images
rose from 1.9 to 2.9 while the generated images' fell below the real ones', "conv-mcVAE ablation 3"): the
decoder then learns what this critic reads rather than the condition. `shift` translates every image the critic
sees, real and generated alike and differentiably, by a random whole number of pixels (DiffAugment, Zhao et al.
2020), so that it must read the condition wherever it is drawn.

The critic is kept apart from the evaluation's adherence CNN (`modules/image_adherence.py`): another
architecture, its own weights, trained inside the VAE's loop only; the evaluation fits its CNN afresh on the real
images after training and also scores adherence by the nearest real image, which no network's features can be
fooled into.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from modules.conditioning import MaskedConditions


class ConditionCritic(nn.Module):
    """Stride-2 convs (5×5, then 3×3; width, 2·width, 4·width, …) with LeakyReLU down to an 8×8 grid, max and
    mean pooling, one linear head: logits per categorical condition, a value per numerical one."""

    def __init__(self, channels: int, schema, *, width: int = 16, image_size: int = 64, realism: bool = False,
                 balance: float = 0.0, numerical_weight: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.max_shift = int(round(shift * image_size))  # pixels, each way
        self.numerical_weight = numerical_weight
        self.realism = realism  # one more logit: real training image or generated (the GAN discriminator)
        self.balance = balance
        self.vocab_sizes = [len(schema.vocabularies[c.vocabulary]) for c in schema.categorical]
        self.n_numerical = len(schema.numerical)
        self.register_buffer("mask_tokens", torch.tensor(schema.mask_tokens(), dtype=torch.long), persistent=False)
        offsets = torch.tensor([0] + self.vocab_sizes[:-1], dtype=torch.long).cumsum(0) if self.vocab_sizes else None
        self.register_buffer("offsets", offsets, persistent=False)
        # the known categories of every training batch seen so far, per condition (for `balance`; saved, so that a
        # resumed run weighs as the straight one)
        self.register_buffer("category_counts", torch.zeros(sum(self.vocab_sizes)))
        levels = max(1, int(math.log2(max(image_size // 8, 1))))
        layers, previous = [], channels
        for i in range(levels):
            out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(previous, out, 5 if i == 0 else 3, stride=2, padding=2 if i == 0 else 1),
                       nn.LeakyReLU(0.2)]
            previous = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * previous, sum(self.vocab_sizes) + self.n_numerical + int(realism))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.features(images)
        return self.head(torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], dim=1))

    def augment(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Every image translated by its own (dy, dx), whole pixels drawn uniformly from [−max_shift, max_shift],
        the edge pixels repeated into the gap (the sketches' border is background). Nearest sampling at whole-pixel
        offsets copies pixels exactly, and the gradient reaches the image."""
        if self.max_shift == 0:
            return images
        n, _, h, w = images.shape
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (n, 2), generator=generator,
                               device=images.device).to(images.dtype)
        theta = images.new_zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        # output pixel (i, j) reads input (i − dy, j − dx): a shift by (dy, dx); 2/size per pixel in [−1, 1]
        theta[:, 0, 2] = -2.0 * shifts[:, 1] / w
        theta[:, 1, 2] = -2.0 * shifts[:, 0] / h
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="nearest", padding_mode="border", align_corners=False)

    def condition_loss(self, out: torch.Tensor, cat: torch.Tensor, num: torch.Tensor, keep_cat: torch.Tensor,
                       keep_num: torch.Tensor, *, balance: float = 0.0, weight_numerical: float = 1.0) -> torch.Tensor:
        """Σ over conditions of the cross-entropy (categorical) or 1 − R² (numerical: squared error over the
        variance of the targets, so that it weighs like a cross-entropy), each over its kept rows. `balance` α > 0
        weighs a row's cross-entropy by its category's training frequency^−α (normalised to a mean weight of 1
        over the kept rows): α = 1 counts every category alike, however rare."""
        loss, start = out.new_zeros(()), 0
        for j, size in enumerate(self.vocab_sizes):
            keep = keep_cat[:, j]
            if keep.any():
                ce = F.cross_entropy(out[keep, start:start + size], cat[keep, j], reduction="none")
                if balance > 0:
                    counts = self.category_counts[start:start + size]
                    frequency = (counts / counts.sum().clamp_min(1.0)).clamp_min(1e-3)
                    weight = frequency[cat[keep, j]].pow(-balance)
                    ce = ce * weight / weight.mean()
                loss = loss + ce.mean()
            start += size
        for j in range(self.n_numerical):
            keep = keep_num[:, j]
            if keep.sum() > 1:
                target = num[keep, j]
                loss = loss + weight_numerical * F.mse_loss(out[keep, start + j], target) / target.var().clamp_min(1e-4)
        return loss

    def losses(self, real: torch.Tensor, cat: torch.Tensor, num: torch.Tensor, generated: torch.Tensor,
               asked: MaskedConditions, generator: Optional[torch.Generator] = None
               ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(critic loss: the real images against all their known conditions `cat`/`num`; generator loss: the
        critic, frozen, on the generated images against the visible conditions they were generated from, `asked`;
        the generator's GAN loss, or None without `realism`).

        The critic's weights get gradients from the first term only and the generator from the second only. In
        training, both image sets are translated first (`augment`, drawing from `generator`)."""
        known_cat, known_num = cat != self.mask_tokens, ~torch.isnan(num)
        if self.training and self.vocab_sizes:
            with torch.no_grad():
                codes = (cat + self.offsets)[known_cat]
                self.category_counts += torch.bincount(codes, minlength=len(self.category_counts)).to(
                    self.category_counts.dtype)
        real = real.detach()
        if self.training:
            real, generated = self.augment(real, generator), self.augment(generated, generator)
        on_real = self(real)
        critic = self.condition_loss(on_real, cat, num, known_cat, known_num)
        frozen = {name: value.detach() for name, value in self.named_parameters()}
        judged = functional_call(self, frozen, (generated,))
        visible_cat = asked.categorical != self.mask_tokens
        generator = self.condition_loss(judged, asked.categorical, asked.numerical, visible_cat, ~asked.numerical_mask,
                                        balance=self.balance, weight_numerical=self.numerical_weight)
        if not self.realism:
            return critic, generator, None
        # non-saturating GAN losses (Goodfellow et al. 2014): the critic tells real from generated, the generator
        # makes its images pass for real
        on_generated = self(generated.detach())
        critic = critic + F.softplus(-on_real[:, -1]).mean() + F.softplus(on_generated[:, -1]).mean()
        return critic, generator, F.softplus(-judged[:, -1]).mean()


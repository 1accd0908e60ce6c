"""mcVAE: an MLP VAE over parametric designs whose decoder sees the masked condition embedding."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from modules.base import MaskedConditionalVAE
from modules.conditioning import MaskedConditions
from modules.config import (ConditioningConfig, DataConfig, EvaluationConfig, LRSchedulerConfig, OptimizerConfig,
                            SparsityConfig, TrainerConfig, WandbConfig)
from modules.data import MinMaxScaler

ACTIVATIONS = {"selu": nn.SELU, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "elu": nn.ELU}


@dataclass
class MCVAEModelConfig:
    design_embedding_dim: int = 64  # first encoder layer / last decoder layer
    hidden_dims: list[int] = field(default_factory=lambda: [128, 64, 32])  # encoder; the decoder mirrors it
    latent_dim: int = 10
    activation: Literal["selu", "relu", "gelu", "silu", "tanh", "elu"] = "selu"
    # lecun: N(0, 1/fan_in) weights, zero biases, which SELU's self-normalisation assumes (Klambauer et al. 2017,
    # Sec. 3); pytorch: nn.Linear's default uniform init
    init: Literal["lecun", "pytorch"] = "lecun"
    # keep an exponential moving average of the generative path (condition embedding + decoder) for
    # evaluation and sampling; null = use the trained weights as they are
    ema_decay: Optional[float] = 0.999
    kl_weight: float = 0.7  # loss = (1 - w)·reconstruction + w·KL; with `gaussian_nll`, w = 0.5 is the ELBO
    # sse: Σ squared error over features and batch; sse_per_design: Σ over features, mean over the batch;
    # mse: mean over both; gaussian_nll: −log N(x; x̂, σ²) per design (a Gaussian decoder, σ: decoder_sigma),
    # averaged over the batch. The KL term is always the batch mean of the per-design KL.
    reconstruction: Literal["sse", "sse_per_design", "mse", "gaussian_nll"] = "sse_per_design"
    # the prior of z: standard N(0, I) (the paper), or conditional p(z | c) = N(μ(c), σ²(c)) from the masked
    # condition embedding, so that sampled latents agree with the conditions asked for
    prior: Literal["standard", "conditional"] = "standard"
    # gaussian_nll: the decoder's σ as a fraction of each feature's normalised range (fixed), or null = learned
    decoder_sigma: Optional[float] = None
    prior_hidden_dim: int = 64  # width of the conditional prior's hidden layer
    # the encoder sees the masked conditions too, q(z | x, c) (a CVAE), so z need not carry what c says
    encoder_conditions: bool = False
    # the condition embedding enters every decoder layer (concatenated to its input), not only the first
    decoder_conditions: Literal["input", "every_layer"] = "input"
    # sampling temperature τ: z = μ_p + τ·σ_p·ε at generation (training is unaffected); < 1 trades diversity for
    # samples closer to the typical design of the conditions
    temperature: float = 1.0


@dataclass
class MCVAERunConfig:
    model_type: Literal["mcvae"]
    data: DataConfig
    model: MCVAEModelConfig = field(default_factory=MCVAEModelConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def check_mcvae_config(cfg: MCVAERunConfig, source: str) -> None:
    """Ranges of the model section."""
    from modules.training import require

    m = cfg.model
    for key in ("design_embedding_dim", "latent_dim"):
        require(getattr(m, key) >= 1, source, f"model.{key}", "≥ 1", getattr(m, key))
    require(len(m.hidden_dims) > 0 and all(h >= 1 for h in m.hidden_dims), source, "model.hidden_dims",
            "a non-empty list of sizes ≥ 1", m.hidden_dims)
    require(m.ema_decay is None or 0 < m.ema_decay < 1, source, "model.ema_decay", "in (0, 1) or null", m.ema_decay)
    require(0 <= m.kl_weight <= 1, source, "model.kl_weight", "in [0, 1]", m.kl_weight)
    require(m.prior_hidden_dim >= 1, source, "model.prior_hidden_dim", "≥ 1", m.prior_hidden_dim)
    require(m.temperature >= 0, source, "model.temperature", "≥ 0 (0: the prior mean)", m.temperature)
    require(m.decoder_sigma is None or m.decoder_sigma > 0, source, "model.decoder_sigma", "> 0 or null",
            m.decoder_sigma)
    from modules.errors import UserError
    from modules.plotting import resolve_plot_style

    try:  # a style that cannot draw these columns fails now, not at `sample.py --plot` after training
        resolve_plot_style(cfg.data.plot_style, cfg.data.design_columns)
    except UserError as err:
        raise UserError(f"{source}: {err}") from None


def mlp(dims: list[int], activation: type[nn.Module], *, last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(dims) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class ConditionedMLP(nn.Module):
    """An MLP whose every layer sees the condition vector c: layer i computes W_i·h + V_i·c + b_i, a Linear over
    [h, c]. The V_i·c + b_i of all layers come from one matmul per step (tiny layers: op count is the cost)."""

    def __init__(self, dims: list[int], condition_dim: int, activation: type[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.condition = nn.Linear(condition_dim, sum(dims[1:]))  # [V_1; …; V_n] and the biases
        self.widths = list(dims[1:])
        self.activation = activation()

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        from_condition = self.condition(c).split(self.widths, dim=1)
        for i, (layer, bias) in enumerate(zip(self.layers, from_condition)):
            h = torch.addmm(bias, h, layer.weight.t())
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h


def lecun_normal_(module: nn.Module) -> None:
    """N(0, 1/fan_in) weights and zero biases for every Linear in `module`; a ConditionedMLP's layer i has the
    fan-in of its h and c together."""
    if isinstance(module, ConditionedMLP):
        rows = module.condition.weight.split(module.widths, dim=0)
        for layer, condition_rows in zip(module.layers, rows):
            std = (layer.in_features + module.condition.in_features) ** -0.5
            nn.init.normal_(layer.weight, std=std)
            with torch.no_grad():
                condition_rows.normal_(0.0, std)
        nn.init.zeros_(module.condition.bias)
        return
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, prior: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                  ) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per sample, summed over latent dims (Kingma & Welling 2014, App. B); with
    `prior` = (μ_p, log σ_p²), KL(N(μ, σ²) ‖ N(μ_p, σ_p²)) = ½ Σ [log σ_p² − log σ² + (σ² + (μ − μ_p)²)/σ_p² − 1]."""
    if prior is None:
        return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)
    prior_mu, prior_logvar = prior
    return 0.5 * torch.sum(prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1,
                           dim=1)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """−log N(x; mean, σ²) per sample, summed over features, without the constant ½·D·log 2π."""
    return (0.5 * ((x - mean) / log_sigma.exp()).pow(2) + log_sigma).sum(dim=1)


class MCVAE(MaskedConditionalVAE):
    """Encoder q(z | x) over the design only; decoder p(x | z, c) on [z, embedded masked conditions]."""

    config_cls = MCVAERunConfig
    model_type = "mcvae"

    def __init__(self, *, config: dict, schema: dict, design_scaler: dict, split_digest: Optional[str] = None):
        super().__init__(config=config, schema=schema)
        self.save_hyperparameters()
        self.scaler = MinMaxScaler.from_state(design_scaler)
        m = self.cfg.model
        act = ACTIVATIONS[m.activation]
        design_dim = len(self.scaler.columns)
        enc_dims = [design_dim + (self.embedding.out_dim if m.encoder_conditions else 0), m.design_embedding_dim,
                    *m.hidden_dims]
        self.encoder = mlp(enc_dims, act, last_activation=True)
        self.to_posterior = nn.Linear(enc_dims[-1], 2 * m.latent_dim)
        if m.decoder_conditions == "every_layer":
            self.decoder = ConditionedMLP([m.latent_dim, *reversed(m.hidden_dims), m.design_embedding_dim, design_dim],
                                          self.embedding.out_dim, act)
        else:
            dec_dims = [m.latent_dim + self.embedding.out_dim, *reversed(m.hidden_dims), m.design_embedding_dim]
            self.decoder = nn.Sequential(mlp(dec_dims, act, last_activation=True),
                                         nn.Linear(m.design_embedding_dim, design_dim))
        # p(z | c): the masked condition embedding → (μ_p, log σ_p²); all conditions masked gives the marginal
        self.prior_net = (mlp([self.embedding.out_dim, m.prior_hidden_dim, 2 * m.latent_dim], act, last_activation=False)
                          if m.prior == "conditional" else None)
        # the decoder's log σ per design feature (gaussian_nll): fixed, or learned from σ = 0.1 of the range
        if m.reconstruction == "gaussian_nll" and m.decoder_sigma is None:
            self.log_sigma = nn.Parameter(torch.full((design_dim,), math.log(0.1)))
        else:  # fixed σ (from the config, not saved), or none for the squared-error losses
            fixed = m.reconstruction == "gaussian_nll"
            self.register_buffer("log_sigma", torch.full((design_dim,), math.log(m.decoder_sigma)) if fixed else None,
                                 persistent=False)
        if m.init == "lecun":
            for module in (self.encoder, self.to_posterior, self.decoder, self.prior_net):
                if module is not None:
                    lecun_normal_(module)
        if self.prior_net is not None:  # start at N(0, I): the prior learns where designs with c lie
            nn.init.zeros_(self.prior_net[-1].weight)
            nn.init.zeros_(self.prior_net[-1].bias)
        self.enable_ema(m.ema_decay)

    def generative_modules(self) -> nn.ModuleDict:
        modules = {"embedding": self.embedding, "decoder": self.decoder}
        if self.prior_net is not None:
            modules["prior_net"] = self.prior_net
        return nn.ModuleDict(modules)

    @property
    def latent_shape(self) -> tuple[int]:
        return (self.cfg.model.latent_dim,)

    # ------------------------------------------------------------------ model
    def encode(self, design: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x), the paper's mcVAE; q(z | x, c) with `model.encoder_conditions` (c: the condition embedding)."""
        if self.cfg.model.encoder_conditions:
            design = torch.cat([design, c], dim=1)
        mu, logvar = self.to_posterior(self.encoder(design)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor, c: torch.Tensor, *, averaged: bool = False) -> torch.Tensor:
        """p(x | z, c) from the condition embedding c; `averaged` uses the EMA weights when the model keeps them."""
        decoder = self.ema.shadow["decoder"] if averaged and self.ema is not None else self.decoder
        if self.cfg.model.decoder_conditions == "every_layer":
            return decoder(z, c)
        return decoder(torch.cat([z, c], dim=1))

    def loss(self, design, reconstruction, mu, logvar, prior=None) -> dict[str, torch.Tensor]:
        """(1 - w)·rec + w·KL with KL = batch mean of the per-design KL(q(z | x) ‖ p(z | c)) (summed over latent
        dims) and rec the squared error summed over batch and features ('sse'), summed over features and averaged
        over the batch ('sse_per_design'), averaged over both ('mse'), or the Gaussian negative log-likelihood
        with σ per feature (fixed or learned) averaged over the batch ('gaussian_nll'; w = ½: ½·(−ELBO), Kingma &
        Welling 2014, Eq. 10)."""
        w = self.cfg.model.kl_weight
        rec, kl = self.loss_terms(design, reconstruction, mu, logvar, prior)
        return {"loss": (1 - w) * rec + w * kl, "reconstruction": rec, "kl": kl}

    def loss_terms(self, design, reconstruction, mu, logvar, prior=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rec, KL) of `loss`, before they are weighed (modules/stacked.py weighs them per stacked model)."""
        mode = self.cfg.model.reconstruction
        if mode == "gaussian_nll":
            rec = gaussian_nll(design, reconstruction, self.log_sigma).mean()
        else:
            rec = F.mse_loss(reconstruction, design, reduction="sum" if mode != "mse" else "mean")
            if mode == "sse_per_design":
                rec = rec / design.shape[0]
        return rec, kl_divergence(mu, logvar, prior).mean()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample(self, conditions: Mapping | pd.DataFrame | None = None, n: int = 1, *,
               seed: Optional[int] = None) -> pd.DataFrame:
        """Designs in the original units and column names for any subset of conditions (the rest masked).

        `conditions` is a dict {name: value} (n designs) or a DataFrame (n designs per row; NaN = masked).
        The returned frame carries the requested conditions as columns after the design columns.
        """
        generated, frame = self.generate_for(conditions, n, seed)
        designs = self.scaler.inverse(generated)
        return pd.concat([designs, frame.reset_index(drop=True)], axis=1)

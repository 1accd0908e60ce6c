"""mcVAE: an MLP VAE over parametric designs whose decoder sees the masked condition embedding."""
from __future__ import annotations

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
    kl_weight: float = 0.7  # loss = (1 - w)·reconstruction + w·KL
    # sse: Σ squared error over features and batch; sse_per_design: Σ over features, mean over the batch;
    # mse: mean over both. The KL term is always the batch mean of the per-design KL.
    reconstruction: Literal["sse", "sse_per_design", "mse"] = "sse_per_design"


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


def mlp(dims: list[int], activation: type[nn.Module], *, last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(dims) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def lecun_normal_(module: nn.Module) -> None:
    """N(0, 1/fan_in) weights and zero biases for every Linear in `module`."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
            nn.init.zeros_(layer.bias)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per sample, summed over latent dims (Kingma & Welling 2014, App. B)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


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
        enc_dims = [design_dim, m.design_embedding_dim, *m.hidden_dims]
        self.encoder = mlp(enc_dims, act, last_activation=True)
        self.to_posterior = nn.Linear(enc_dims[-1], 2 * m.latent_dim)
        dec_dims = [m.latent_dim + self.embedding.out_dim, *reversed(m.hidden_dims), m.design_embedding_dim]
        self.decoder = nn.Sequential(mlp(dec_dims, act, last_activation=True),
                                     nn.Linear(m.design_embedding_dim, design_dim))
        if m.init == "lecun":
            for module in (self.encoder, self.to_posterior, self.decoder):
                lecun_normal_(module)
        self.enable_ema(m.ema_decay)

    def generative_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"embedding": self.embedding, "decoder": self.decoder})

    @property
    def latent_shape(self) -> tuple[int]:
        return (self.cfg.model.latent_dim,)

    # ------------------------------------------------------------------ model
    def encode(self, design: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_posterior(self.encoder(design)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor, conditions: MaskedConditions, *, averaged: bool = False) -> torch.Tensor:
        """p(x | z, c); `averaged` uses the EMA weights when the model keeps them."""
        if averaged and self.ema is not None:
            embedding, decoder = self.ema.shadow["embedding"], self.ema.shadow["decoder"]
        else:
            embedding, decoder = self.embedding, self.decoder
        return decoder(torch.cat([z, embedding(conditions)], dim=1))

    def loss(self, design, reconstruction, mu, logvar) -> dict[str, torch.Tensor]:
        """(1 - w)·rec + w·KL with KL = batch mean of the per-design KL (summed over latent dims) and rec the squared
        error summed over batch and features ('sse'), summed over features and averaged over the batch
        ('sse_per_design') or averaged over both ('mse')."""
        w = self.cfg.model.kl_weight
        mode = self.cfg.model.reconstruction
        rec = F.mse_loss(reconstruction, design, reduction="sum" if mode != "mse" else "mean")
        if mode == "sse_per_design":
            rec = rec / design.shape[0]
        kl = kl_divergence(mu, logvar).mean()
        return {"loss": (1 - w) * rec + w * kl, "reconstruction": rec, "kl": kl}

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

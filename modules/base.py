"""The LightningModule base every masked-conditioning model shares: schema, masking, embedding, sparsity, RNG."""
from __future__ import annotations

import warnings
from typing import Mapping, Optional

import pandas as pd
import pytorch_lightning as pl
import torch

from torch import nn

from modules.conditioning import (ConditionEmbedding, ConditionMasking, ConditionSchema, MaskedConditions,
                                  OutOfRangeCondition)
from modules.config import build_dataclass, build_lr_scheduler
from modules.ema import EMA
from modules.errors import UserError


def step_generator(seed: int, stream: int, step: int, *, rank: int = 0, device=None) -> torch.Generator:
    """The generator of optimizer step `step` of a run with `seed` (stream 0: training masks and noise, 1 + i:
    validation batch i): also what modules/stacked.py draws from, so a stacked model sees its single run's masks."""
    g = torch.Generator(device=device or "cpu")
    # DDP: masks and noise differ per rank (rank 0: as on one device)
    g.manual_seed((seed * 1_000_003 + stream) * 1_000_003 + step + 7_919 * rank)
    return g


class MaskedConditioningModule(pl.LightningModule):
    """Holds the fitted condition schema, `ConditionMasking` and `ConditionEmbedding` built from the run config,
    and the training loop every model shares (manual optimisation, fused steps, EMA, epoch logging, AdamW + StepLR).

    Subclasses set `config_cls` and `model_type` and define `_step(batch, p, generator) -> {"loss": ..., ...}`
    (masking the batch's conditions with probability p); with an EMA, `generative_modules()` names what it averages.
    """

    config_cls: type
    model_type: str

    def __init__(self, *, config: dict, schema: dict):
        super().__init__()
        self.automatic_optimization = False  # the shared loop below; Lightning's closure costs more than a small step
        self.cfg = build_dataclass(self.config_cls, config, source="checkpoint config")
        self.schema = ConditionSchema.from_state(schema)
        c = self.cfg.conditioning
        self.masking = ConditionMasking.for_schema(self.schema, sentinel=c.sentinel)
        self.embedding = ConditionEmbedding(self.schema, dim=c.embedding_dim, numerical_mask=c.numerical_mask)
        self.sparsity = self.cfg.sparsity.initial
        self.sparsity_schedule = None  # set by the SparsityScheduler callback
        self._epoch_sums: dict[str, tuple[tuple[str, ...], torch.Tensor, int]] = {}  # stage → (keys, sums, count)
        self._plain_backward: Optional[bool] = None
        self.ema: Optional[EMA] = None
        self._ema_sources: Optional[list[torch.Tensor]] = None

    # ------------------------------------------------------------------ EMA
    def generative_modules(self) -> nn.ModuleDict:
        """The modules that generate (and that an EMA averages); subclasses with `enable_ema` define it."""
        return nn.ModuleDict()

    def enable_ema(self, decay: Optional[float]) -> None:
        self.ema = EMA(self.generative_modules(), decay=decay) if decay else None

    def _averaged_parameters(self) -> list[torch.Tensor]:
        """The live parameters the EMA follows, in the order of `generative_modules().parameters()` (cached)."""
        if self._ema_sources is None:
            self._ema_sources = list(self.generative_modules().parameters())
        return self._ema_sources

    def _apply(self, fn, recurse=True):
        self._ema_sources = None  # moving the module may replace the parameter tensors
        return super()._apply(fn, recurse)

    def backward_step(self, loss: torch.Tensor) -> None:
        """Gradients of `loss` for a manual optimizer step (used instead of `manual_backward`).

        On one device in 32-bit precision Lightning's `manual_backward` only adds hook calls, which cost as much as
        a small model's whole backward pass; with DDP or mixed precision its strategy/precision handling is used.
        """
        if self._plain_backward is None:
            from pytorch_lightning.plugins.precision import Precision
            from pytorch_lightning.strategies import SingleDeviceStrategy

            strategy = self.trainer.strategy
            self._plain_backward = (type(strategy) is SingleDeviceStrategy
                                    and type(strategy.precision_plugin) is Precision)
        if self._plain_backward:
            loss.backward()
        else:
            self.manual_backward(loss)

    def step_generator(self, stream: int = 0) -> torch.Generator:
        """RNG for masks and noise as a function of (seed, stream, global step): a resumed run draws the same numbers."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return step_generator(self.cfg.trainer.seed, stream, int(self.global_step), rank=rank, device=self.device)

    def current_sparsity(self) -> float:
        """The masking probability for this optimizer step (per-step schedules are evaluated at `global_step`,
        so fused steps follow the curve exactly)."""
        schedule = self.sparsity_schedule
        if schedule is not None and schedule.interval == "step" and self.training:
            self.sparsity = schedule(self.global_step)
        return self.sparsity

    def mask(self, categorical: torch.Tensor, numerical: torch.Tensor, p: float,
             generator: Optional[torch.Generator] = None, *, drop_all: float = 0.0) -> MaskedConditions:
        return self.masking(categorical, numerical, p, generator, drop_all=drop_all)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # batches are slices of tensors that already live on the device: skip Lightning's collection walk
        if isinstance(batch, tuple) and all(isinstance(t, torch.Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ------------------------------------------------------------------ the shared training loop
    def training_step(self, batch, batch_idx):
        """One optimizer step per `trainer.accumulate_grad_batches` batches; a list of batches (`fused_steps` > 1
        or accumulation) is several of them in a row. Returns the mean loss (NaN if any step's loss was NaN)."""
        optimizer = self.optimizers()
        batches = batch if isinstance(batch, list) else [batch]
        k = self.cfg.trainer.accumulate_grad_batches
        losses = []
        for start in range(0, len(batches), k):
            micro = batches[start:start + k]
            p = self.current_sparsity()  # one p per optimizer step, also with accumulation
            optimizer.zero_grad(set_to_none=True)
            for i, one in enumerate(micro):
                # stream 0 for the first micro-batch keeps runs without accumulation unchanged
                out = self._step(one, p, self.step_generator(0 if i == 0 else 10_000 + i))
                self.backward_step(out["loss"] / len(micro) if len(micro) > 1 else out["loss"])
                self.accumulate(out, one[0].shape[0], stage="train")
                losses.append(out["loss"].detach())
            if self.cfg.optimizer.gradient_clip_val:
                self.clip_gradients(optimizer, gradient_clip_val=self.cfg.optimizer.gradient_clip_val)
            optimizer.step()  # advances global_step, which seeds the next step's masks and noise
            if self.ema is not None:
                self.ema.update(self._averaged_parameters())
        return torch.stack(losses).mean()

    def on_train_epoch_end(self):
        self.log_epoch("train", sparsity=float(self.sparsity), lr=self.optimizers().param_groups[0]["lr"])
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def validation_step(self, batch, batch_idx):
        out = self._step(batch, self.current_sparsity(), self.step_generator(1 + batch_idx))
        self.accumulate(out, batch[0].shape[0], stage="val")

    def on_validation_epoch_end(self):
        metrics = self.log_epoch("val")
        if "val/loss" in metrics:
            self.log("val/loss", metrics["val/loss"], logger=False)  # what the best checkpoint is chosen by

    def configure_optimizers(self):
        o, s = self.cfg.optimizer, self.cfg.lr_scheduler
        # fused AdamW runs on CPU too and is the fastest implementation for many small tensors
        optimizer = torch.optim.AdamW(self.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                      fused=True)
        scheduler = build_lr_scheduler(optimizer, s, self.cfg.trainer.max_epochs)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------ cheap epoch-level logging
    def accumulate(self, values: dict[str, torch.Tensor], n: int, *, stage: str = "train") -> None:
        """Sum detached scalar batch metrics (weighted by batch size) without a host sync per step."""
        weighted = torch.stack(list(values.values())).detach() * n
        if stage in self._epoch_sums:
            keys, total, count = self._epoch_sums[stage]
            self._epoch_sums[stage] = (keys, total + weighted, count + n)
        else:
            self._epoch_sums[stage] = (tuple(values), weighted, n)

    def log_epoch(self, stage: str, **extra: float) -> dict[str, float]:
        """Write the epoch means of what `accumulate` summed (as <stage>/<name>) and `extra` to the loggers at the
        optimizer step, then start over. Straight to the loggers: `self.log` costs about as much per key as an
        optimizer step of a small MLP, and its step counts Lightning steps, not optimizer steps."""
        metrics = dict(extra, epoch=self.current_epoch)
        if stage in self._epoch_sums:
            keys, total, count = self._epoch_sums.pop(stage)
            if self._trainer is not None and self.trainer.world_size > 1:  # DDP: over every rank's batches
                both = self.trainer.strategy.reduce(torch.cat([total, total.new_tensor([count])]), reduce_op="sum")
                total, count = both[:-1], both[-1]
            metrics.update({f"{stage}/{k}": v for k, v in zip(keys, (total / count).tolist())})
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        return metrics

    def evaluation_target(self, x: torch.Tensor) -> torch.Tensor:
        """What generated outputs are compared with in evaluation: the data itself (latent models: decoded)."""
        return x

    # ------------------------------------------------------------------ user-facing conditions
    def conditions_from(self, conditions: Mapping | pd.DataFrame | None, n: int) -> tuple[MaskedConditions, pd.DataFrame]:
        """Encode a dict (one set of conditions, n times) or a DataFrame (n times each row); absent conditions and
        empty cells are masked. Returns the masked conditions and the request as rows."""
        if conditions is None:
            conditions = {}
        if isinstance(conditions, Mapping):
            parsed = {k: self.schema.parse_value(k, v) for k, v in conditions.items()}
            frame = pd.DataFrame([parsed] * n, columns=list(parsed)) if parsed else pd.DataFrame(index=range(n))
        elif isinstance(conditions, pd.DataFrame):
            unknown = [c for c in conditions.columns if c not in self.schema.names]
            if unknown:
                raise UserError(f"unknown condition '{unknown[0]}'. Valid conditions: {', '.join(self.schema.names)}.")
            frame = conditions.loc[conditions.index.repeat(n)].reset_index(drop=True)
        else:
            raise TypeError("conditions must be a dict, a pandas DataFrame or None")
        cat, num = self.schema.encode(frame, source="conditions")
        outside = self.schema.out_of_range(frame)
        if outside:
            warnings.warn("; ".join(outside) + ". The model never saw such values; the designs are extrapolated. "
                          "Ask within the range (sample.py --strict refuses such requests).", OutOfRangeCondition,
                          stacklevel=3)
        cat, num = cat.to(self.device), num.to(self.device)
        # absent conditions are already mask tokens / NaN, which `apply` keeps masked
        masked = self.masking.apply(cat, num, torch.zeros_like(cat, dtype=torch.bool), torch.isnan(num))
        return masked, frame

    @torch.no_grad()
    def generate_for(self, conditions: Mapping | pd.DataFrame | None, n: int,
                     seed: Optional[int] = None) -> tuple[torch.Tensor, pd.DataFrame]:
        """Generated outputs (the model's own space) for a dict or DataFrame request, and the request as rows;
        seeded, or fresh entropy without touching torch's global RNG; the training mode is kept."""
        was_training = self.training
        self.eval()
        masked, frame = self.conditions_from(conditions, n)
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        generated = self.generate(masked, generator=generator)
        self.train(was_training)
        return generated, frame


class MaskedConditionalVAE(MaskedConditioningModule):
    """A VAE whose decoder sees the masked conditions. Subclasses define `encode(x, c) -> (μ, log σ²)`,
    `decode(z, c, averaged=False)`, `loss(x, x̂, μ, log σ², prior)` and `latent_shape`, where c is the embedded
    condition vector (`embed`, computed once per step), and may define a learned prior p(z | c) with
    `prior(c, averaged) -> (μ_p, log σ_p²)` (default: None = N(0, I))."""

    def embed(self, conditions: MaskedConditions, *, averaged: bool = False) -> torch.Tensor:
        """The condition embedding of the masked conditions (the EMA copy with `averaged`)."""
        embedding = self.ema.shadow["embedding"] if averaged and self.ema is not None else self.embedding
        return embedding(conditions)

    def prior(self, c: torch.Tensor, *, averaged: bool = False):
        """(μ_p, log σ_p²) of p(z | c), each of `latent_shape`, from the subclass's `prior_net` (c → both,
        flattened; the EMA copy with `averaged`); None for N(0, I) (no prior_net, or None)."""
        live = getattr(self, "prior_net", None)  # not a class attribute: nn.Module keeps modules in _modules
        if live is None:
            return None
        prior_net = self.ema.shadow["prior_net"] if averaged and self.ema is not None else live
        out = prior_net(c).reshape(len(c), 2 * self.latent_shape[0], *self.latent_shape[1:])
        mu, logvar = out.chunk(2, dim=1)
        return mu, logvar

    @property
    def temperature(self) -> float:
        """τ of z = μ_p + τ·σ_p·ε at generation (`model.temperature` where the model has one)."""
        return float(getattr(self.cfg.model, "temperature", 1.0))

    def _reconstruct(self, x, c: torch.Tensor, generator: Optional[torch.Generator] = None,
                     noise: Optional[torch.Tensor] = None):
        """(x̂, μ, log σ², z) with z drawn from q(z | x(, c)); `noise`: the standard normal ε, drawn when not given."""
        mu, logvar = self.encode(x, c)
        eps = noise if noise is not None else torch.randn(mu.shape, generator=generator, device=mu.device,
                                                          dtype=mu.dtype)
        z = mu + eps * torch.exp(0.5 * logvar)  # reparameterisation (Kingma & Welling 2014, Eq. 10)
        return self.decode(z, c), mu, logvar, z

    def forward(self, x, conditions: MaskedConditions, generator: Optional[torch.Generator] = None):
        """(x̂, μ, log σ²) of a design and its masked conditions."""
        return self._reconstruct(x, self.embed(conditions), generator)[:3]

    def _step(self, batch, p: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, cat, num = batch
        masked = self.mask(cat, num, p, generator)
        c = self.embed(masked)
        reconstruction, mu, logvar, z = self._reconstruct(x, c, generator)
        out = self.loss(x, reconstruction, mu, logvar, self.prior(c))
        for name, (value, weight) in self.auxiliary_losses(x, cat, num, masked, c, z, generator).items():
            out["loss"] = out["loss"] + weight * value
            out[name] = value
        return out

    def auxiliary_losses(self, x, cat, num, masked: MaskedConditions, c, z, generator) -> dict:
        """name → (loss, weight) added to the VAE loss, each logged under its name (the conv-mcVAE's condition
        critic); x, cat, num: the batch; masked / c: its masked conditions and their embedding; z ~ q(z | x)."""
        return {}

    @torch.no_grad()
    def generate(self, conditions: MaskedConditions, z: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Decoded from z ~ p(z | c) and the masked conditions, with the EMA weights when the model keeps them; in
        the model's own space (normalised designs, images in the value range). `z` is the standard normal noise ε
        (drawn when not given): z = μ_p(c) + τ·σ_p(c)·ε under a learned prior, z = τ·ε under N(0, I) (τ: the
        sampling temperature, 1 by default), so one ε shared by every design (the paper's protocol) means the same
        thing for both."""
        if z is None:
            z = torch.randn((len(conditions), *self.latent_shape), generator=generator, device=self.device)
        c = self.embed(conditions, averaged=True)
        return self.decode(self.from_prior(z.to(self.device) * self.temperature, c, averaged=True), c, averaged=True)

    def from_prior(self, eps: torch.Tensor, c: torch.Tensor, averaged: bool = False) -> torch.Tensor:
        """z ~ p(z | c) from standard normal noise ε: μ_p(c) + σ_p(c)·ε under a learned prior, ε under N(0, I)."""
        prior = self.prior(c, averaged=averaged)
        return eps if prior is None else prior[0] + eps * torch.exp(0.5 * prior[1])


class ImageSampling:
    """`sample` for models whose `generate` returns images in `cfg.data.value_range`."""

    @torch.no_grad()
    def sample(self, conditions=None, n: int = 1, *, seed: Optional[int] = None) -> torch.Tensor:
        """uint8 images (n per request row, shape (N, C, H, W)) for any subset of conditions (the rest masked);
        `conditions` a dict or a DataFrame, as for the mcVAE."""
        from modules.image_data import from_model_range

        generated, _ = self.generate_for(conditions, n, seed)
        return from_model_range(generated, self.cfg.data.value_range)

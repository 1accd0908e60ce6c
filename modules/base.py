"""The LightningModule base every masked-conditioning model shares: schema, masking, embedding, sparsity, RNG."""
from __future__ import annotations

from typing import Mapping, Optional

import pandas as pd
import pytorch_lightning as pl
import torch

from modules.conditioning import ConditionEmbedding, ConditionMasking, ConditionSchema, MaskedConditions
from modules.config import build_dataclass
from modules.errors import UserError


class MaskedConditioningModule(pl.LightningModule):
    """Holds the fitted condition schema, `ConditionMasking` and `ConditionEmbedding` built from the run config.

    Subclasses set `config_cls` and `model_type`, and read `self.sparsity` (set by the `SparsityScheduler`
    callback) when they mask conditions in a training step.
    """

    config_cls: type
    model_type: str

    def __init__(self, *, config: dict, schema: dict):
        super().__init__()
        self.cfg = build_dataclass(self.config_cls, config, source="checkpoint config")
        self.schema = ConditionSchema.from_state(schema)
        c = self.cfg.conditioning
        self.masking = ConditionMasking.for_schema(self.schema, sentinel=c.sentinel)
        self.embedding = ConditionEmbedding(self.schema, dim=c.embedding_dim, numerical_mask=c.numerical_mask)
        self.sparsity = self.cfg.sparsity.initial
        self.sparsity_schedule = None  # set by the SparsityScheduler callback
        self._epoch_sums: dict[str, tuple[tuple[str, ...], torch.Tensor, int]] = {}  # stage → (keys, sums, count)
        self._plain_backward: Optional[bool] = None

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
        g = torch.Generator(device=self.device)
        g.manual_seed((self.cfg.trainer.seed * 1_000_003 + stream) * 1_000_003 + int(self.global_step))
        return g

    def current_sparsity(self) -> float:
        """The masking probability for this optimizer step (per-step schedules are evaluated at `global_step`,
        so fused steps follow the curve exactly)."""
        schedule = self.sparsity_schedule
        if schedule is not None and schedule.interval == "step" and self.training:
            self.sparsity = schedule(self.global_step)
        return self.sparsity

    def mask(self, categorical: torch.Tensor, numerical: torch.Tensor, p: float,
             generator: Optional[torch.Generator] = None) -> MaskedConditions:
        return self.masking(categorical, numerical, p, generator)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # batches are slices of tensors that already live on the device: skip Lightning's collection walk
        if isinstance(batch, tuple) and all(isinstance(t, torch.Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

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
            metrics.update({f"{stage}/{k}": v for k, v in zip(keys, (total / count).tolist())})
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        return metrics
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
        cat, num = cat.to(self.device), num.to(self.device)
        # absent conditions are already mask tokens / NaN, which `apply` keeps masked
        masked = self.masking.apply(cat, num, torch.zeros_like(cat, dtype=torch.bool), torch.isnan(num))
        return masked, frame

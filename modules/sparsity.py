"""Sparsity schedules: the masking probability p as a function of training progress, and the Lightning callback."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import pytorch_lightning as pl

from modules.config import SparsityConfig

SCHEDULES = ("constant", "step", "linear", "exponential", "cosine")


@dataclass
class SparsitySchedule:
    """p(t) for t = epoch or optimizer step; reaches `target` exactly at `target_at` and holds it."""

    schedule: str = "linear"
    initial: float = 0.1
    target: Optional[float] = 0.2
    target_at: int = -1  # resolved (≥ 0) by `resolved`; -1 = end of training
    step_size: int = 10
    exponential_rate: float = 5.0
    interval: str = "epoch"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown sparsity schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name, value in (("initial", self.initial), ("target", self.end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"sparsity.{name} must lie in [0, 1], got {value}")
        if self.schedule == "step" and self.step_size < 1:
            raise ValueError(f"sparsity.step_size must be ≥ 1, got {self.step_size}")
        if self.schedule == "exponential" and self.exponential_rate == 0:
            raise ValueError("sparsity.exponential_rate must be non-zero (use `linear` for a straight line)")

    @classmethod
    def from_config(cls, cfg: SparsityConfig) -> "SparsitySchedule":
        return cls(**asdict(cfg))

    def resolved(self, total: int) -> "SparsitySchedule":
        """Replace target_at = -1 by the last epoch/step index of a run with `total` epochs/steps."""
        if self.target_at >= 0:
            return self
        return SparsitySchedule(**{**asdict(self), "target_at": max(int(total) - 1, 0)})

    @property
    def end(self) -> float:
        return self.initial if self.schedule == "constant" or self.target is None else self.target

    def __call__(self, t: int) -> float:
        if self.target_at < 0:
            raise ValueError("resolve target_at = -1 with `.resolved(total)` before evaluating the schedule")
        start, end, horizon = self.initial, self.end, self.target_at
        if self.schedule == "constant" or t >= horizon:
            return end
        frac = max(t, 0) / horizon  # in [0, 1) here
        if self.schedule == "linear":
            shape = frac
        elif self.schedule == "cosine":
            shape = 0.5 * (1.0 - math.cos(math.pi * frac))
        elif self.schedule == "exponential":
            # exponential easing; unlike initial·(target/initial)^frac it allows 0 at either end
            k = self.exponential_rate
            shape = math.expm1(k * frac) / math.expm1(k)
        else:  # step: ceil(horizon / step_size) equal stairs, the last one at `target_at`
            stairs = math.ceil(horizon / self.step_size)
            shape = (t // self.step_size) / stairs
        return start + (end - start) * shape

    def curve(self, total: int) -> list[float]:
        schedule = self.resolved(total)
        return [schedule(t) for t in range(total)]


class SparsityScheduler(pl.Callback):
    """Sets `pl_module.sparsity` every epoch or optimizer step; its state lives in the checkpoint, so a
    resumed run continues the same curve (even when the resumed run has another `max_epochs`)."""

    def __init__(self, schedule: SparsitySchedule):
        self.schedule = schedule

    def _set(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        pl_module.sparsity = self.schedule(t)

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and self.schedule.target_at < 0:
            total = trainer.max_epochs if self.schedule.interval == "epoch" else self._total_steps(trainer)
            self.schedule = self.schedule.resolved(int(total))

    @staticmethod
    def _total_steps(trainer) -> int:
        """Optimizer steps of the whole run (fused steps count one by one)."""
        loader = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else None
        steps = getattr(loader, "n_optimizer_steps", None)  # with gradient accumulation: fewer than batches
        if steps is None:
            return int(trainer.estimated_stepping_batches)
        return int(steps * trainer.max_epochs)

    def on_train_start(self, trainer, pl_module):
        pl_module.sparsity_schedule = self.schedule  # after a resume: the restored one
        # a run resumed inside an epoch gets no on_train_epoch_start for that epoch
        t = trainer.current_epoch if self.schedule.interval == "epoch" else trainer.global_step
        self._set(trainer, pl_module, t)

    def on_train_epoch_start(self, trainer, pl_module):
        t = trainer.current_epoch if self.schedule.interval == "epoch" else trainer.global_step
        self._set(trainer, pl_module, t)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.schedule.interval == "step":
            self._set(trainer, pl_module, trainer.global_step)  # models with fused steps re-evaluate per step

    def state_dict(self) -> dict:
        return asdict(self.schedule)

    def load_state_dict(self, state_dict: dict) -> None:
        self.schedule = SparsitySchedule(**state_dict)


def plot_schedule(schedules: dict[str, SparsitySchedule] | SparsitySchedule, total: int, *, ax=None, title=None):
    """Plot one or several schedules over `total` epochs/steps; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if isinstance(schedules, SparsitySchedule):
        schedules = {schedules.schedule: schedules}
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure
    interval = "epoch"
    for label, schedule in schedules.items():
        interval = schedule.interval
        ax.plot(range(total), schedule.curve(total), label=label, drawstyle="steps-post")
    ax.set_xlabel(interval)
    ax.set_ylabel("sparsity p")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "sparsity schedule")
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    """`python -m modules.sparsity --cfg_name mcvae_biked --out schedule.png [--compare]`: draw a config's schedule."""
    import argparse
    from pathlib import Path

    from modules.config import build_dataclass, config_path, read_yaml

    p = argparse.ArgumentParser(description="Plot the sparsity schedule of a config (or all five schedules).")
    p.add_argument("--cfg_name", help="config in configs/ without .yaml")
    p.add_argument("--config", help="path of a YAML config")
    p.add_argument("--out", default="sparsity_schedule.png", help="PNG file to write")
    p.add_argument("--compare", action="store_true", help="draw all five schedules between the config's endpoints")
    args = p.parse_args(argv)
    path = config_path(args.cfg_name, args.config)
    raw = read_yaml(path)
    try:
        cfg = SparsitySchedule.from_config(build_dataclass(SparsityConfig, raw.get("sparsity", {}), source=str(path),
                                                           prefix="sparsity."))
    except ValueError as err:
        from modules.errors import UserError

        raise UserError(f"{path}: {err}.") from None
    total = raw.get("trainer", {}).get("max_epochs", 500)
    if cfg.interval == "step":
        print("interval: step — the x axis counts optimizer steps; using max_epochs as the number of steps")
    schedules = ({k: SparsitySchedule(**{**asdict(cfg), "schedule": k}) for k in SCHEDULES} if args.compare
                 else {cfg.schedule: cfg})
    fig = plot_schedule(schedules, total, title=f"sparsity schedule{'s' if args.compare else ''}: "
                                                f"{cfg.initial} → {cfg.end}")
    fig.savefig(Path(args.out), dpi=110)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    from modules.errors import cli_entry

    raise SystemExit(cli_entry(main)())

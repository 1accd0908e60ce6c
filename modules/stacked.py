"""K mcVAEs of one architecture trained at once in one process: the cells of a sweep that differ only in seeds,
split seeds, sparsity schedules, KL weights or the decoder's σ (`experiments/sweep.py --stack`).

Their parameters are stacked along a leading model axis; one forward and backward pass serves all K through
`torch.func.vmap` over `functional_call`, and one fused AdamW steps the stacked tensors. A tiny MLP's step is
mostly per-op overhead (benchmarks/RESULTS.md, "mcVAE speed"), which stacking pays once for K models.

Each stacked model computes what its own run (`train_mcvae.py`) computes: the same initial weights (built under
its seed), batches (its data order, `TensorBatches.shuffled_order`), masks and noise (drawn from
`step_generator` of its seed and step, outside vmap, in the order `_step` draws them), losses, AdamW update,
EMA and sparsity schedule. Only the batched matrix products add in another order, so the weights agree to float
rounding (tests/test_stacked.py). Each model then gets the run directory of a normal run: config.yaml,
split.csv, metrics.csv, plots, checkpoints/last.ckpt (weights only; evaluate and sample with it) and eval/.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from modules.base import step_generator
from modules.conditioning import MaskedConditions
from modules.config import build_lr_scheduler, to_dict
from modules.data import TensorBatches
from modules.errors import UserError
from modules.sparsity import SparsitySchedule

# what may differ between the models of one stack: everything else must be equal (`stack_signature`)
PER_MODEL_KEYS = ("trainer.seed", "data.split.seed", "sparsity", "model.kl_weight", "model.decoder_sigma",
                  "model.temperature", "evaluation", "wandb")


def stack_signature(cfg) -> str:
    """The config without the keys a stack lets differ (PER_MODEL_KEYS): runs with one signature can stack."""
    raw = to_dict(cfg)
    for key in PER_MODEL_KEYS:
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node.get(part, {})
        node.pop(last, None)
    return json.dumps(raw, sort_keys=True, default=str)


def load_mcvae_config(path: str | Path):
    """(config, source) of a YAML file, read and validated as `train_mcvae.py --config PATH` reads it."""
    from modules.registry import MCVAE_SPEC
    from modules.training import common_parser, load_run_config

    args = common_parser(MCVAE_SPEC.description).parse_args(["--config", str(path)])
    return load_run_config(args, MCVAE_SPEC.config_cls, check=MCVAE_SPEC.check)


class _TrainingTerms(nn.Module):
    """One model's (reconstruction, KL) from masks and noise drawn beforehand: `_step` without the draws."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, categorical, numerical, numerical_mask, eps):
        m = self.model
        c = m.embed(MaskedConditions(categorical, numerical, numerical_mask))
        reconstruction, mu, logvar, _ = m._reconstruct(x, c, noise=eps)
        return m.loss_terms(x, reconstruction, mu, logvar, m.prior(c))


@dataclass
class StackedRun:
    """One model of a stack: its validated config, data, model (with the trained weights after `fit`) and run dir."""
    cfg: object
    source: str
    datamodule: object
    model: object
    run_dir: Optional[Path] = None
    seconds: float = 0.0


def build_runs(configs: Sequence[tuple[object, str]]) -> list[StackedRun]:
    """Data and initial model of every config, each built under its own seed as `train_main` builds it."""
    import pytorch_lightning as pl

    from modules.registry import MCVAE_SPEC

    runs = []
    for cfg, source in configs:
        pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
        dm, model = MCVAE_SPEC.build(cfg, None)
        runs.append(StackedRun(cfg, source, dm, model))
    return runs


def _shape_key(run: StackedRun) -> tuple:
    return (len(run.datamodule.tensors["train"][0]), len(run.datamodule.tensors["val"][0]),
            tuple((n, tuple(p.shape)) for n, p in run.model.named_parameters()))


def stackable_groups(runs: Sequence[StackedRun]) -> list[list[int]]:
    """Indices of the runs that can train in one stack: one signature, the same split sizes and parameter shapes."""
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault((stack_signature(run.cfg), _shape_key(run)), []).append(i)
    return list(groups.values())


class StackedTrainer:
    """Trains the runs of one stackable group together (see the module docstring); `fit()` then `finish()`."""

    def __init__(self, runs: Sequence[StackedRun], *, progress: bool = True):
        if len(stackable_groups(runs)) != 1:
            raise UserError("these runs cannot train in one stack: their configs differ in more than "
                            f"{', '.join(PER_MODEL_KEYS)}, or their split sizes or parameter shapes differ "
                            "(stackable_groups() sorts them)")
        self.runs = list(runs)
        self.progress = progress
        cfg = runs[0].cfg
        t = cfg.trainer
        if t.accumulate_grad_batches != 1 or t.precision != "32-true" or t.devices not in (1, "auto") \
                or t.num_nodes != 1 or t.strategy not in ("auto", "single_device"):
            raise UserError(f"{runs[0].source}: a stack trains in 32-bit precision on one device without gradient "
                            "accumulation (trainer.accumulate_grad_batches = 1, precision 32-true, devices 1); run "
                            "this config as separate processes (experiments/sweep.py without --stack)")
        models = [r.model for r in runs]
        self.device = torch.device("cuda" if t.accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "cpu")
        for r in runs:
            r.model.to(self.device)
            r.datamodule.device = self.device
            r.datamodule.tensors = {k: tuple(x.to(self.device) for x in v) for k, v in r.datamodule.tensors.items()}
        self.template = _TrainingTerms(copy.deepcopy(models[0])).to(self.device)
        wrapped = [dict(_TrainingTerms(m).named_parameters()) for m in models]
        self.trained = [n for n, p in self.template.named_parameters() if p.requires_grad]
        self.params = {n: torch.stack([w[n].detach() for w in wrapped]).requires_grad_() for n in self.trained}
        buffers = [dict(_TrainingTerms(m).named_buffers()) for m in models]
        self.buffer_names = [n for n in buffers[0] if not n.startswith("model.ema.")]
        self.buffers = {n: torch.stack([b[n] for b in buffers]) for n in self.buffer_names}
        # the EMA of the generative modules, stacked like the parameters it follows
        self.ema = models[0].ema
        if self.ema is not None:
            names = [n for n, _ in models[0].generative_modules().named_parameters()]
            self.ema_names = names
            self.ema_shadow = [torch.stack([dict(m.ema.shadow.named_parameters())[n].detach() for m in models])
                               for n in names]
            self.ema_live = [self.params[f"model.{n}"] for n in names]
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay, fused=True)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, t.max_epochs)
        self.kl_weights = torch.tensor([r.cfg.model.kl_weight for r in runs], device=self.device)
        self.rec_weights = torch.tensor([1 - r.cfg.model.kl_weight for r in runs], device=self.device)
        self.steps_per_epoch = TensorBatches(runs[0].datamodule.tensors["train"], batch_size=t.batch_size,
                                             shuffle=True).n_batches
        self.schedules = []
        for r in runs:
            schedule = SparsitySchedule.from_config(r.cfg.sparsity)
            total = t.max_epochs if schedule.interval == "epoch" else self.steps_per_epoch * t.max_epochs
            self.schedules.append(schedule.resolved(int(total)))
        self.global_step = 0
        self.epoch = 0
        self._terms = vmap(self._one_model)

    # ------------------------------------------------------------------ the step
    def _one_model(self, params, buffers, x, categorical, numerical, numerical_mask, eps):
        return functional_call(self.template, (params, buffers), (x, categorical, numerical, numerical_mask, eps))

    def _stacked(self, split: str, order: Optional[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """(K, N, …) tensors of every run's `split`, in each run's `order` (None: as stored)."""
        parts = [r.datamodule.tensors[split] for r in self.runs]
        if order is not None:
            parts = [tuple(t.index_select(0, o.to(t.device)) for t in p) for p, o in zip(parts, order)]
        return tuple(torch.stack(column) for column in zip(*parts))

    def _draw(self, categorical, numerical, p: list[float], stream: int):
        """Masks and reparameterisation noise of every model for this step, drawn from its own generator in the
        order its single run draws them (`MaskedConditioningModule.mask`, then `_reconstruct`)."""
        masking = self.runs[0].model.masking
        k, b = categorical.shape[:2]
        n_cat = categorical.shape[2]
        latent = self.runs[0].model.cfg.model.latent_dim
        uniforms, noise = [], []
        for run in self.runs:
            g = step_generator(run.cfg.trainer.seed, stream, self.global_step, device=self.device)
            uniforms.append(torch.rand((b, n_cat + numerical.shape[2]), generator=g, device=self.device))
            noise.append(torch.randn((b, latent), generator=g, device=self.device))
        mask = torch.stack(uniforms) < torch.tensor(p, device=self.device).view(k, 1, 1)
        cat_mask, num_mask = mask[..., :n_cat], mask[..., n_cat:]
        masked = masking.apply(categorical, numerical, cat_mask, num_mask)
        return masked, torch.stack(noise)

    def _losses(self, batch, p: list[float], stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, 3) [loss, reconstruction, KL] of every model on its batch, and the (K,) losses to differentiate."""
        x, cat, num = batch
        masked, eps = self._draw(cat, num, p, stream)
        rec, kl = self._terms(self.params, self.buffers, x, masked.categorical, masked.numerical,
                              masked.numerical_mask, eps)
        loss = self.rec_weights * rec + self.kl_weights * kl
        return torch.stack([loss, rec, kl], dim=1), loss

    def _clip(self, max_norm: float) -> None:
        """Each model's gradient norm clipped on its own (`clip_grad_norm_` per model)."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)  # (K,)
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))

    def _sparsities(self, step: bool) -> list[float]:
        t = self.global_step if step else self.epoch
        return [s(t) for s in self.schedules]

    def fit(self) -> None:
        """All epochs of every model; the epoch logs go to each run's metrics.csv."""
        from modules.progress import bar

        cfg = self.runs[0].cfg
        t = cfg.trainer
        by_step = self.schedules[0].interval == "step"
        loggers = self._loggers()
        started = time.perf_counter()
        val = self._stacked("val", None) if len(self.runs[0].datamodule.tensors["val"][0]) else None
        epochs = bar(range(t.max_epochs), desc=f"{len(self.runs)} stacked models", unit="epoch",
                     shown=None if self.progress else False)
        for self.epoch in epochs:
            p = self._sparsities(False)
            orders = [TensorBatches.shuffled_order(len(r.datamodule.tensors["train"][0]), r.cfg.trainer.seed,
                                                   self.epoch) for r in self.runs]
            data = self._stacked("train", orders)
            sums, rows = None, 0
            for i in range(self.steps_per_epoch):
                batch = tuple(d[:, i * t.batch_size:(i + 1) * t.batch_size] for d in data)
                if by_step:
                    p = self._sparsities(True)
                self.optimizer.zero_grad(set_to_none=True)
                terms, loss = self._losses(batch, p, 0)
                loss.sum().backward()  # the models are independent: each gets its own loss's gradient
                if cfg.optimizer.gradient_clip_val:
                    self._clip(cfg.optimizer.gradient_clip_val)
                self.optimizer.step()
                self.global_step += 1
                if self.ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(self.ema_shadow, [q.detach() for q in self.ema_live],
                                             1.0 - self.ema.current_decay())
                    self.ema._updates += 1
                n = batch[0].shape[1]
                weighted = terms.detach() * n
                sums, rows = (weighted if sums is None else sums + weighted), rows + n
            if val is not None and (self.epoch + 1) % t.check_val_every_n_epoch == 0:
                self._validate(val, p, loggers)
            train = (sums / rows).tolist()
            lr = self.optimizer.param_groups[0]["lr"]
            for k, logger in enumerate(loggers):
                logger.log_metrics({"sparsity": float(p[k]), "lr": lr, "epoch": self.epoch,
                                    **dict(zip(("train/loss", "train/reconstruction", "train/kl"), train[k]))},
                                   step=self.global_step)
            diverged = [self.runs[k].run_dir for k, row in enumerate(train) if not all(map(_finite, row))]
            if diverged:
                raise TrainingDivergedInStack(f"the training loss became non-finite at epoch {self.epoch} in "
                                              f"{', '.join(map(str, diverged))}; lower the learning rate or check "
                                              "the data, and run those cells on their own")
            if self.scheduler is not None:
                self.scheduler.step()
            if not self.progress and (self.epoch + 1) % max(1, t.max_epochs // 10) == 0:
                # no bar (a sweep worker writes to its log): a line every tenth of the run, for `tail -f`
                losses = [row[0] for row in train]
                print(f"{len(self.runs)} stacked models: epoch {self.epoch + 1}/{t.max_epochs}, "
                      f"{time.perf_counter() - started:.0f} s, train loss {min(losses):.4g} … {max(losses):.4g}",
                      flush=True)
        seconds = time.perf_counter() - started
        for r, logger in zip(self.runs, loggers):
            logger.save()
            r.seconds = seconds / len(self.runs)
        self._unstack()

    @torch.no_grad()
    def _validate(self, val, p, loggers) -> None:
        """The validation loss of every model, as Lightning's validation loop computes it (stream 1 + batch)."""
        batch_size = self.runs[0].cfg.trainer.batch_size
        sums, rows = None, 0
        for i in range(0, val[0].shape[1], batch_size):
            batch = tuple(v[:, i:i + batch_size] for v in val)
            terms, _ = self._losses(batch, p, 1 + i // batch_size)
            n = batch[0].shape[1]
            sums, rows = (terms * n if sums is None else sums + terms * n), rows + n
        for k, (logger, row) in enumerate(zip(loggers, (sums / rows).tolist())):
            logger.log_metrics({"epoch": self.epoch, **dict(zip(("val/loss", "val/reconstruction", "val/kl"), row))},
                               step=self.global_step)

    def _loggers(self):
        from modules.training import RunCSVLogger

        return [RunCSVLogger(r.run_dir) for r in self.runs]

    @torch.no_grad()
    def _unstack(self) -> None:
        """Model k's trained weights (and EMA) back into its module."""
        for k, run in enumerate(self.runs):
            wrapped = _TrainingTerms(run.model)
            live = dict(wrapped.named_parameters())
            for name in self.trained:
                live[name].copy_(self.params[name][k])
            if self.ema is not None:
                shadow = dict(run.model.ema.shadow.named_parameters())
                for name, stacked in zip(self.ema_names, self.ema_shadow):
                    shadow[name].copy_(stacked[k])
                run.model.ema.updates.fill_(self.ema._updates)
                run.model.ema._updates = self.ema._updates
            run.model.sparsity = self.schedules[k](self.epoch if self.schedules[k].interval == "epoch"
                                                   else self.global_step - 1)
            run.model.eval()


class TrainingDivergedInStack(UserError):
    """A stacked model's loss became NaN or infinite."""


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def save_checkpoint(run: StackedRun, global_step: int, epoch: int) -> Path:
    """<run>/checkpoints/last.ckpt with the trained weights and the run's hyper-parameters (written atomically).
    It holds no optimizer state: evaluate.py and sample.py read it; train_mcvae.py --ckpt_path refuses it."""
    import pytorch_lightning as pl

    from modules.training import AtomicCheckpointIO

    path = run.run_dir / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({
        "state_dict": run.model.state_dict(), "hyper_parameters": dict(run.model.hparams),
        "epoch": epoch, "global_step": global_step, "pytorch-lightning_version": pl.__version__,
        "stacked_training": True}, path)
    return path


def train_stacked(configs: Sequence[tuple[object, str]], run_dirs: Sequence[Path], *, evaluate: bool = True,
                  progress: bool = True) -> list[StackedRun]:
    """Train the configs in as few stacks as `stackable_groups` allows, then write each run directory as
    `train_main` does: config.yaml, split.csv, metrics.csv, plots/, checkpoints/last.ckpt and (with `evaluate`)
    eval/. Returns the runs in the order of `configs` (`seconds`: its share of its stack's training time plus its
    own evaluation)."""
    from modules.plotting import plot_training_curves
    from modules.registry import MCVAE_SPEC
    from modules.training import write_config

    runs = build_runs(configs)
    for run, run_dir in zip(runs, run_dirs):
        run.run_dir = Path(run_dir)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run.cfg, run.run_dir)
        run.datamodule.split_frame().to_csv(run.run_dir / "split.csv", index=False)
    for group in stackable_groups(runs):
        members = [runs[i] for i in group]
        trainer = StackedTrainer(members, progress=progress)
        trainer.fit()
        print(f"trained {len(members)} stacked models × {trainer.epoch + 1} epochs in "
              f"{sum(r.seconds for r in members):.1f} s")
        for run in members:
            started = time.perf_counter()
            save_checkpoint(run, trainer.global_step, trainer.epoch)
            plot_training_curves(run.run_dir / "metrics.csv", run.run_dir / "plots")
            if evaluate and len(run.datamodule.tensors["test"][0]):
                MCVAE_SPEC.evaluate(run.model, run.datamodule, run.run_dir / "eval", split="test", wandb_run=None)
            run.seconds += time.perf_counter() - started
    return runs


def main(argv=None) -> int:
    """`python -m modules.stacked CONFIG.yaml ... [--logdir DIR] [--no_eval]`: train mcVAE configs that differ only
    in PER_MODEL_KEYS stacked in this process (others in their own stacks), each into its own run directory."""
    import argparse

    import torch

    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0].strip("`"))
    p.add_argument("configs", nargs="+", help="YAML configs, as train_mcvae.py --config reads them")
    p.add_argument("--logdir", default="logs", help="run directories go to <logdir>/<config name>_<timestamp>")
    p.add_argument("--no_eval", action="store_true", help="skip the evaluation of each trained model")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a sweep worker)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from modules.training import make_run_dir

    configs = [load_mcvae_config(path) for path in args.configs]
    run_dirs = [make_run_dir(args.logdir, Path(path).stem) for path in args.configs]
    for run_dir in run_dirs:
        print(f"run directory: {run_dir}", flush=True)
    runs = train_stacked(configs, run_dirs, evaluate=not args.no_eval, progress=True)
    for run in runs:
        print(f"{run.run_dir}: {run.seconds:.1f} s (its share of the stack's training, and its evaluation)")
    return 0


if __name__ == "__main__":
    from modules.errors import cli_entry

    raise SystemExit(cli_entry(main)())

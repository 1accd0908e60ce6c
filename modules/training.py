"""Shared building blocks of the train scripts: CLI, config resolution, run directory, trainer, loggers, callbacks."""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import os
import shlex
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import Callback, Checkpoint, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.plugins.io import TorchCheckpointIO

from modules.config import (build_dataclass, check_dotted_key, config_path, parse_assignment, read_yaml, set_dotted,
                            to_dict)
from modules.errors import TrainingDiverged, UserError
from modules.sparsity import SparsitySchedule, SparsityScheduler


# --------------------------------------------------------------------------- command line


def common_parser(description: str) -> argparse.ArgumentParser:
    """The flags every train script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--cfg_name", help="config file in configs/ without .yaml")
    p.add_argument("--config", help="path of a YAML config (instead of --cfg_name)")
    p.add_argument("--name", help="run name (default: the config name); the run directory is <logdir>/<name>_<timestamp>")
    p.add_argument("--use_wandb", action="store_true", help="log to Weights & Biases (offline when there is no network or API key)")
    p.add_argument("--run_id", help="W&B run id to continue")
    p.add_argument("--ckpt_path", help="checkpoint to resume the exact run from (weights, optimizer, LR and sparsity schedules, epoch)")
    p.add_argument("--csv_path", help="override data.csv_path")
    p.add_argument("--max_epochs", type=int, help="override trainer.max_epochs")
    p.add_argument("--seed", type=int, help="override trainer.seed (weights, noise and masks; the split has data.split.seed)")
    p.add_argument("--logdir", default="logs", help="where run directories are created (default: logs/)")
    p.add_argument("--accelerator", help="override trainer.accelerator (cpu, gpu, auto)")
    p.add_argument("--devices", help="override trainer.devices (a number or 'auto')")
    p.add_argument("--num_nodes", type=int, help="override trainer.num_nodes (machines of a multi-node run)")
    p.add_argument("--strategy", help="override trainer.strategy (ddp for several devices or nodes)")
    p.add_argument("--precision", help="override trainer.precision (32-true, bf16-mixed, 16-mixed)")
    p.add_argument("--no_eval", action="store_true", help="skip the evaluation at the end of training")
    p.add_argument("--print_config", action="store_true",
                   help="print the resolved config (file or checkpoint, flags and --set applied) as YAML and exit")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="override one config key (repeatable; the value is read as YAML), e.g. --set optimizer.lr=3e-4 "
                        "--set model.latent_dim=16")
    return p


def load_run_config(args: argparse.Namespace, config_cls: type, *, check: Callable[[Any, str], None] | None = None,
                    extra_flags: tuple = (), stored: Optional[dict] = None):
    """Read the YAML named on the command line, apply the CLI overrides (flags, then --set) and validate; returns
    (config, source). `extra_flags`: a model's own (flag, section, key, help) overrides, such as --images_path.
    `stored`: the config a checkpoint holds; it is the run's config when --ckpt_path comes without a config file."""
    if stored is not None and not (args.cfg_name or args.config):
        raw, source = copy.deepcopy(stored), f"{args.ckpt_path} (the checkpoint's config)"
    else:
        path = config_path(args.cfg_name, args.config)
        raw, source = read_yaml(path), str(path)
    overrides = {
        ("data", "csv_path"): args.csv_path,
        ("trainer", "max_epochs"): args.max_epochs,
        ("trainer", "seed"): args.seed,
        ("trainer", "accelerator"): args.accelerator,
        ("trainer", "devices"): _devices(args.devices),
        ("trainer", "num_nodes"): getattr(args, "num_nodes", None),
        ("trainer", "precision"): getattr(args, "precision", None),
        ("trainer", "strategy"): getattr(args, "strategy", None),
        **{(section, key): getattr(args, flag.lstrip("-")) for flag, section, key, _ in extra_flags},
    }
    for (section, key), value in overrides.items():
        if value is not None and section is None:  # a top-level key, such as the first stage's export_force
            raw[key] = value
        elif value is not None:
            if not isinstance(raw.get(section, {}), dict):
                raise UserError(f"{source}: '{section}' must be a mapping.")
            raw.setdefault(section, {})[key] = value
    assignments = [parse_assignment(text) for text in getattr(args, "overrides", None) or []]
    for key, value in assignments:
        check_dotted_key(config_cls, key)
        set_dotted(raw, key, value)
    if assignments:
        source += " with " + " ".join(f"--set {key}={value!r}" for key, value in assignments)
    cfg = build_dataclass(config_cls, raw, source=source)
    check_common(cfg, source)
    if check:
        check(cfg, source)
    return cfg, source


def flag_options(config_cls: type, section: Optional[str], key: str) -> dict:
    """argparse options of a model's extra flag: a switch (present → True, absent → no override) when the key it
    sets is a bool, such as the first stage's --export; otherwise it takes a value."""
    import dataclasses
    import typing

    node = config_cls if section is None else typing.get_type_hints(config_cls).get(section)
    hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
    return {"action": "store_true", "default": None} if hints.get(key) is bool else {}


def _devices(value: Optional[str]):
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def require(ok: bool, source: str, key: str, rule: str, value) -> None:
    """A config value outside its range is an error naming the key and the file."""
    if not ok:
        raise UserError(f"{source}: {key} must be {rule}, got {value!r}. Fix the value in the file (or the flag).")


PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


def resolve_precision(precision: str, accelerator: str) -> str:
    """bf16-mixed where the device supports it: GPUs without bf16 (before Ampere) get 16-mixed, with a warning."""
    if precision.startswith("bf16") and accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            warnings.warn(f"this GPU has no bf16: trainer.precision {precision} → 16-mixed", stacklevel=2)
            return "16-mixed"
    return precision


def check_common(cfg, source: str) -> None:
    """Ranges and relations between keys that types alone do not catch (shared sections). A config without a
    `conditioning` section (the first stage, modules/first_stage_training.py) has only trainer, optimizer and
    lr_scheduler of these."""
    conditioned = hasattr(cfg, "conditioning")
    if conditioned:
        try:
            SparsitySchedule.from_config(cfg.sparsity)
        except ValueError as err:
            raise UserError(f"{source}: {err}.") from None
    t, o = cfg.trainer, cfg.optimizer
    for key in ("max_epochs", "batch_size", "check_val_every_n_epoch", "checkpoint_every_n_epochs",
                "log_every_n_steps", "fused_steps", "accumulate_grad_batches", "num_nodes"):
        require(getattr(t, key) >= 1, source, f"trainer.{key}", "≥ 1", getattr(t, key))
    require(0 <= t.seed < 2**32, source, "trainer.seed", "in [0, 2^32)", t.seed)
    require(t.checkpoint_every_n_steps is None or t.checkpoint_every_n_steps >= 1, source,
            "trainer.checkpoint_every_n_steps", "≥ 1 or null", t.checkpoint_every_n_steps)
    require(t.precision in PRECISIONS, source, "trainer.precision", f"one of {', '.join(PRECISIONS)}", t.precision)
    require(t.num_threads is None or t.num_threads >= 1, source, "trainer.num_threads", "≥ 1 or null", t.num_threads)
    # 'auto' means one device (Lightning's 'auto' would take every GPU); more need trainer.strategy: ddp
    require(t.devices == "auto" or (isinstance(t.devices, int) and t.devices >= 1), source, "trainer.devices",
            "a number ≥ 1 or 'auto'", t.devices)
    require(o.lr > 0, source, "optimizer.lr", "> 0", o.lr)
    require(all(0 <= b < 1 for b in o.betas), source, "optimizer.betas", "two numbers in [0, 1)", list(o.betas))
    require(o.weight_decay >= 0, source, "optimizer.weight_decay", "≥ 0", o.weight_decay)
    require(o.gradient_clip_val is None or o.gradient_clip_val > 0, source, "optimizer.gradient_clip_val",
            "> 0 or null", o.gradient_clip_val)
    require(cfg.lr_scheduler.step_size >= 1, source, "lr_scheduler.step_size", "≥ 1", cfg.lr_scheduler.step_size)
    require(cfg.lr_scheduler.gamma > 0, source, "lr_scheduler.gamma", "> 0", cfg.lr_scheduler.gamma)
    require(0 <= cfg.lr_scheduler.min_lr_ratio <= 1, source, "lr_scheduler.min_lr_ratio", "in [0, 1]",
            cfg.lr_scheduler.min_lr_ratio)
    if not conditioned:
        return
    e = cfg.evaluation
    require(cfg.conditioning.embedding_dim >= 1, source, "conditioning.embedding_dim", "≥ 1",
            cfg.conditioning.embedding_dim)
    if cfg.sparsity.interval == "epoch" and cfg.sparsity.target_at >= t.max_epochs:
        # allowed (a short run that a resume will extend), but said out loud
        warnings.warn(f"{source}: sparsity.target_at = {cfg.sparsity.target_at} lies beyond the end of training "
                      f"(trainer.max_epochs = {t.max_epochs}): this run stops before the sparsity reaches "
                      f"{cfg.sparsity.target}. Use -1 for the end of training.", stacklevel=2)
    require(len(e.sparsity_levels) > 0 and all(0.0 <= v <= 1.0 for v in e.sparsity_levels), source,
            "evaluation.sparsity_levels", "a non-empty list of numbers in [0, 1]", e.sparsity_levels)
    require(e.prior_draws >= 1, source, "evaluation.prior_draws", "≥ 1", e.prior_draws)
    require(e.diversity_groups >= 1, source, "evaluation.diversity_groups", "≥ 1", e.diversity_groups)
    require(e.diversity_samples >= 2, source, "evaluation.diversity_samples", "≥ 2", e.diversity_samples)
    design_columns = getattr(cfg.data, "design_columns", None)  # parametric data only
    require(e.samples_per_design >= 2 or (e.samples_per_design == 0 and design_columns is None), source,
            "evaluation.samples_per_design", "≥ 2 (the energy score's spread needs two samples), or 0 to skip the "
            "sample-based errors (image models)", e.samples_per_design)
    require(e.asked_for_rows >= 0, source, "evaluation.asked_for_rows", "≥ 0 (0 skips the asked-for adherence)",
            e.asked_for_rows)
    if design_columns is not None:
        require(len(design_columns) > 0, source, "data.design_columns", "a non-empty list", [])
    if not cfg.data.conditions:
        raise UserError(f"{source}: data.conditions is empty; name at least one condition column.")
    names = [c.name for c in cfg.data.conditions]
    overlap = set(names) & set(design_columns or [])
    if overlap:
        raise UserError(f"{source}: column(s) {sorted(overlap)} are both design columns and conditions.")
    if len(set(names)) != len(names):
        raise UserError(f"{source}: a condition is listed twice in data.conditions.")


# --------------------------------------------------------------------------- run directory


def make_run_dir(logdir: str, name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(logdir) / f"{name}_{stamp}"
    run_dir, k = base, 1
    while run_dir.exists():
        k += 1
        run_dir = Path(f"{base}-{k}")
    run_dir.mkdir(parents=True)
    return run_dir


def run_dir_of_checkpoint(ckpt_path: Path) -> Optional[Path]:
    """<run>/checkpoints/x.ckpt → <run>, when that is a run directory."""
    candidate = ckpt_path.resolve().parent.parent
    return candidate if (candidate / "config.yaml").is_file() else None


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """A whole checkpoint, loaded with weights_only=True; a `UserError` for a missing, truncated or foreign file."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist. Pass the path of a .ckpt file (e.g. <run>/checkpoints/last.ckpt).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file
        raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:200]}). "
                        "It may be truncated or not a checkpoint of this project; use another one.") from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hparams or "config" not in hparams:
        raise UserError(f"checkpoint {path} was not written by this project (it has no stored config).")
    return ckpt


def check_resume_compatible(hparams: dict, cfg, source: str, ckpt_path: str,
                            sections: tuple = ("model", "conditioning")) -> None:
    """A checkpoint resumes only the same model on the same data schema; name what differs (every key of the
    config `sections` that define the architecture, `ModelSpec.resume_sections`)."""
    stored = hparams["config"]
    current = to_dict(cfg)
    if stored.get("model_type") != current["model_type"]:
        raise UserError(f"--ckpt_path {ckpt_path} is a '{stored.get('model_type')}' checkpoint, but {source} configures "
                        f"a '{current['model_type']}' model. Use a checkpoint of the same model or the matching config.")
    differences = []
    for section in sections:
        for key, value in current[section].items():
            if stored.get(section, {}).get(key) != value:
                differences.append(f"{section}.{key}: checkpoint {stored.get(section, {}).get(key)!r}, config {value!r}")
    for key in ("design_columns", "conditions"):
        if stored["data"].get(key) != current["data"].get(key):
            differences.append(f"data.{key} differs")
    for section, key in (("trainer", "seed"), ("trainer", "batch_size"), ("data", "split")):
        # masks, noise, batches or the training designs would change mid-run
        if stored[section].get(key) != current[section][key]:
            differences.append(f"{section}.{key}: checkpoint {stored[section].get(key)!r}, config {current[section][key]!r}")
    if differences:
        raise UserError(f"--ckpt_path {ckpt_path} was trained with another configuration than {source}: "
                        + "; ".join(differences[:6]) + ". Resume with the run's own config (<run>/config.yaml) "
                        "or start a new run.")


@dataclass(frozen=True)
class ResumePoint:
    """Where a checkpoint stands: its optimizer step, its epoch, and whether it was written inside that epoch."""
    global_step: int
    epoch: int
    mid_epoch: bool

    @property
    def next_epoch(self) -> int:
        """The first epoch a resumed run trains (the checkpoint's own epoch when it stopped inside it)."""
        return self.epoch if self.mid_epoch else self.epoch + 1


def resume_step(checkpoint: dict) -> ResumePoint:
    state = next((v for k, v in (checkpoint.get("callbacks") or {}).items() if "LastCheckpoint" in str(k)), {})
    return ResumePoint(int(checkpoint.get("global_step", 0)), int(checkpoint.get("epoch", -1)),
                       bool(state.get("mid_epoch", False)))


def trim_metrics(metrics_csv: Path, point: ResumePoint) -> int:
    """Drop the rows of <run>/metrics.csv that were logged after the checkpoint a run resumes from: the resumed run
    trains those steps again and logs them anew, so no epoch appears twice. Rows are logged at the optimizer step;
    the epoch rows of an epoch that the checkpoint stopped inside came after it. Returns the number dropped."""
    if not metrics_csv.is_file():
        return 0
    with open(metrics_csv, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)

    def after(row) -> bool:
        step = int(float(row["step"])) if row.get("step") not in (None, "") else -1
        epoch = int(float(row["epoch"])) if row.get("epoch") not in (None, "") else -1
        return step > point.global_step or (point.mid_epoch and epoch >= point.epoch)

    kept = [row for row in rows if not after(row)]
    if len(kept) < len(rows):
        tmp = metrics_csv.with_name(f".{metrics_csv.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, metrics_csv)
    return len(rows) - len(kept)


# --------------------------------------------------------------------------- trainer pieces


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file and rename: a crash never leaves a half-written `last.ckpt`."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class LastCheckpoint(Checkpoint):
    """Writes <run>/checkpoints/last.ckpt every N epochs, every K optimizer steps (mid-epoch) and at the end: the
    file `--ckpt_path` resumes from.

    A `Checkpoint` subclass, so Lightning calls it after the module's `on_train_epoch_end` (LR step included). A
    mid-epoch checkpoint records how many training batches (Lightning steps) of its epoch are done; a resumed run
    skips exactly those (the epoch's batch order is a function of seed and epoch), so it continues where the
    checkpoint was written.
    """

    def __init__(self, path: Path, every_n_epochs: int = 1, every_n_steps: Optional[int] = None):
        self.path = Path(path)
        self.every_n_epochs = max(1, every_n_epochs)
        self.every_n_steps = every_n_steps
        self._epoch, self._batches_done, self._mid_epoch = 0, 0, False
        self._last_saved_step = -1

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches_done": self._batches_done, "mid_epoch": self._mid_epoch}

    def setup(self, trainer, pl_module, stage):
        self._trainer = trainer

    def load_state_dict(self, state_dict: dict) -> None:
        # restored before the first batch is fetched (Lightning prefetches it before `on_train_start`): tell the
        # data where the interrupted epoch stood
        if state_dict.get("mid_epoch"):
            epoch, done = int(state_dict["epoch"]), int(state_dict["batches_done"])
            datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
            if datamodule is not None:
                datamodule.skip_batches = (epoch, done)
                # Lightning does not call on_train_epoch_start for an epoch it resumes
                self._epoch, self._batches_done = epoch, done

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch, self._batches_done = trainer.current_epoch, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batches_done += 1
        step = trainer.global_step
        if self.every_n_steps and step // self.every_n_steps > self._last_saved_step // self.every_n_steps:
            self._save(trainer, mid_epoch=True)
        sigterm = getattr(trainer, "received_sigterm", False)
        reason = getattr(trainer, "interrupt_reason", None) or ("SIGTERM" if sigterm else None)
        if reason and batch_idx + 1 >= trainer.num_training_batches:
            # the epoch's last step: let the epoch end (LR step, epoch logs, validation), then stop with the
            # epoch-end checkpoint; a checkpoint written here would resume into an epoch whose end never runs
            trainer.interrupt_reason = reason
            connector = getattr(trainer, "_signal_connector", None)
            if sigterm and connector is not None:
                connector.received_sigterm = False  # else Lightning raises before the epoch's end
            trainer.should_stop = True
        elif reason:
            # Lightning only notes the signal (our Ctrl+C handler does the same); stop at this step boundary
            from pytorch_lightning.utilities.exceptions import SIGTERMException

            raise SIGTERMException()  # → on_exception below writes last.ckpt

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs == 0 or epoch >= trainer.max_epochs or trainer.should_stop:
            self._save(trainer, mid_epoch=False)

    def on_exception(self, trainer, pl_module, exception):
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):  # preemption or Ctrl+C: keep the state of the last finished step
            self._save(trainer, mid_epoch=True)
            reason = getattr(trainer, "interrupt_reason", None) or "SIGTERM"
            print(f"{reason}: saved {self.path} at step {trainer.global_step}", flush=True)

    def _save(self, trainer, *, mid_epoch: bool) -> None:
        self._mid_epoch = mid_epoch
        for logger in trainer.loggers:  # the metrics up to this checkpoint reach the disk with it (a kill loses none)
            logger.save()
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state: this file resumes the run
        self._last_saved_step = trainer.global_step


class StopOnInterrupt:
    """Ctrl+C (SIGINT) during `fit`: finish the current step, write last.ckpt, exit 130. Lightning's own handling
    of KeyboardInterrupt stops mid-step and writes nothing; this routes the first Ctrl+C through the path of a
    SIGTERM (the signal is noted, the step finishes, `LastCheckpoint.on_exception` saves). A second Ctrl+C exits at
    once: atomic writes keep the last complete checkpoint intact."""

    def __init__(self, trainer: pl.Trainer):
        self.trainer, self.requested, self._previous = trainer, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            print("\nsecond Ctrl+C: exiting now; last.ckpt holds the last completed checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(130)
        self.requested = True
        self.trainer.interrupt_reason = "Ctrl+C"
        print("\nCtrl+C: finishing the current step, then saving last.ckpt (press Ctrl+C again to exit at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class LossProgressBar(TQDMProgressBar):
    """Lightning's bar with the training loss (the mean of the last refresh interval's steps), the validation loss
    and the sparsity. The loss is read from the device only when the bar refreshes, so steps stay sync-free."""

    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self._losses: list[torch.Tensor] = []
        self._shown: Optional[str] = None  # kept between refreshes that saw no new step (epoch end, validation)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if self._losses:
            self._shown = f"{torch.stack(self._losses).float().mean().item():.4g}"
            self._losses.clear()
        if self._shown is not None:
            metrics["loss"] = self._shown
        val = trainer.callback_metrics.get("val/loss")
        if val is not None:
            metrics["val_loss"] = f"{float(val):.4g}"
        if hasattr(pl_module, "sparsity"):
            metrics["sparsity"] = f"{float(pl_module.sparsity):.2f}"
        return metrics


class NonFiniteLossGuard(Callback):
    """Stops training at the first NaN/inf loss, before any checkpoint of the broken weights is written."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not bool(torch.isfinite(loss).all()):
            raise TrainingDiverged(
                f"the training loss became {loss.item()} at epoch {trainer.current_epoch}, step {trainer.global_step}. "
                "Training stopped; the last good checkpoint is kept. Lower the learning rate, check the data for "
                "extreme values, or resume from that checkpoint with other settings.")


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (a resumed run appends instead of deleting the history)."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)


class RunCSVLogger(CSVLogger):
    """CSVLogger writing <run>/metrics.csv and appending on resume."""

    def __init__(self, run_dir: Path):
        super().__init__(save_dir=str(run_dir), name="", version="")

    @property
    def experiment(self):
        if self._experiment is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_mode() -> str:
    """'online' only with an API key and a reachable server; WANDB_MODE always wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    netrc = Path.home() / ".netrc"
    if not has_key and netrc.is_file():
        has_key = "api.wandb.ai" in netrc.read_text(errors="ignore")
    if not has_key:
        return "offline"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=3).close()
    except OSError:
        return "offline"
    return "online"


def make_wandb_logger(cfg, run_dir: Path, name: str, run_id: Optional[str]):
    """A WandbLogger that never blocks a run: offline without network/API key; on any failure, no W&B."""
    try:
        import wandb
        from pytorch_lightning.loggers import WandbLogger

        mode = wandb_mode()
        logger = WandbLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, name=name, id=run_id,
                             resume="allow" if run_id else None, save_dir=str(run_dir), mode=mode,
                             config=to_dict(cfg), settings=wandb.Settings(init_timeout=60, silent=True))
        run = logger.experiment  # start now, so a failure is handled here and not mid-training
        hint = f" (upload later: wandb sync {Path(run.dir).parent})" if mode == "offline" else ""
        print(f"W&B: {mode} run {run.id}{hint}")
        return logger
    except Exception as err:  # W&B must never stop a training run
        warnings.warn(f"W&B logging disabled: {type(err).__name__}: {err}")
        return None


@dataclass
class RunSetup:
    run_dir: Path
    checkpoint: ModelCheckpoint
    trainer: pl.Trainer


def trainer_settings(t) -> dict:
    """The Trainer arguments that decide how a step runs (device, precision, determinism): shared by training
    and benchmarks/bench_mcldm.py, so the benchmark times what a run does."""
    return dict(accelerator=t.accelerator, devices=1 if t.devices == "auto" else int(t.devices), strategy=t.strategy,
                num_nodes=t.num_nodes, precision=resolve_precision(t.precision, t.accelerator),
                deterministic=t.deterministic, benchmark=not t.deterministic)


def build_trainer(cfg, run_dir: Path, *, use_wandb: bool, name: str, run_id: Optional[str],
                  validate: bool = True, extra_callbacks: list[Callback] = ()) -> RunSetup:
    """The Lightning trainer of a run; without a validation split there is no validation and no best checkpoint."""
    t = cfg.trainer
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best-epoch={epoch:03d}-val_loss={val/loss:.4f}",
        monitor="val/loss" if validate else None, mode="min", save_top_k=1 if validate else 0, save_last=False,
        auto_insert_metric_name=False,
    )
    last = LastCheckpoint(run_dir / "checkpoints" / "last.ckpt", every_n_epochs=t.checkpoint_every_n_epochs,
                          every_n_steps=t.checkpoint_every_n_steps)
    loggers: list = [RunCSVLogger(run_dir)]
    if use_wandb:
        wandb_logger = make_wandb_logger(cfg, run_dir, name, run_id)
        if wandb_logger is not None:
            loggers.append(wandb_logger)
    # models without masked conditions (the first stage) have no sparsity schedule
    sparsity = [SparsityScheduler(SparsitySchedule.from_config(cfg.sparsity))] if hasattr(cfg, "sparsity") else []
    callbacks = [*sparsity, NonFiniteLossGuard(), checkpoint, last,
                 LossProgressBar(refresh_rate=max(1, t.log_every_n_steps // 5)), *extra_callbacks]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
            trainer = pl.Trainer(
                max_epochs=t.max_epochs, **trainer_settings(t), logger=loggers, callbacks=callbacks,
                default_root_dir=str(run_dir), check_val_every_n_epoch=t.check_val_every_n_epoch,
                log_every_n_steps=t.log_every_n_steps, limit_val_batches=None if validate else 0,
                plugins=[AtomicCheckpointIO()], enable_model_summary=True, num_sanity_val_steps=0,
            )
    except Exception as err:  # Lightning's own words on an impossible accelerator/devices choice
        raise UserError(f"trainer.accelerator = {t.accelerator!r}, trainer.devices = {t.devices!r} cannot be used "
                        f"here: {str(err).splitlines()[0]} Pass --accelerator cpu (or auto) and a --devices count "
                        "this machine has.") from None
    return RunSetup(run_dir, checkpoint, trainer)


def quiet_lightning() -> None:
    """Hide Lightning's advice that does not apply to tensor-sliced batches."""
    for pattern in (".*does not have many workers.*", ".*The number of training batches.*",
                    ".*Experiment logs directory.*", ".*Checkpoint directory .* exists and is not empty.*",
                    ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
                    ".*module\\(s\\) in eval mode at the start of training.*",  # the EMA copy, on purpose
                    ".*overridden `transfer_batch_to_device`.*",  # on purpose: batches are already on the device
                    # LastCheckpoint makes the data resume inside an epoch (it skips the batches already done)
                    ".*resuming from a checkpoint that ended before the epoch ended.*",
                    ".*is not supported by the model summary.*"):  # only the printed size estimate
        warnings.filterwarnings("ignore", message=pattern)
    import logging

    # an advertisement for a cloud logger, printed on every run
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())


def write_config(cfg, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


# --------------------------------------------------------------------------- the training job


RUN_DIR_ENV = "MCLDM_RUN_DIR"


def _launched_rank() -> int:
    """> 0 in a process Lightning's DDP launcher started for another rank."""
    return int(os.environ.get("LOCAL_RANK", 0)) + int(os.environ.get("NODE_RANK", 0))


def train_main(argv, spec) -> int:
    """Config → run directory → fit (or resume) → plots → evaluation. Shared by every train script."""
    quiet_lightning()
    parser = common_parser(spec.description)
    for flag, section, key, help_text in spec.extra_flags:
        parser.add_argument(flag, help=help_text, **flag_options(spec.config_cls, section, key))
    args = parser.parse_args(argv)
    resume_from = read_checkpoint(args.ckpt_path) if args.ckpt_path else None
    hparams = resume_from["hyper_parameters"] if resume_from else None
    # resume from the checkpoint alone: the config it stores is the run's config
    cfg, source = load_run_config(args, spec.config_cls, check=spec.check, extra_flags=spec.extra_flags,
                                  stored=hparams["config"] if hparams else None)
    if args.print_config:  # as Lightning CLI's --print_config: what this command would train, nothing run
        print(f"# {source}")
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
        return 0
    start_epoch, point = 0, None
    if resume_from is not None and resume_from.get("stacked_training"):
        raise UserError(f"--ckpt_path {args.ckpt_path} was written by a stacked sweep (modules/stacked.py): it holds "
                        "the trained weights, not the optimizer and schedule state a resumed run needs. Evaluate or "
                        "sample with it (evaluate.py --ckpt, sample.py --ckpt); to train longer, rerun the cell "
                        "with more epochs.")
    if resume_from is not None:
        point = resume_step(resume_from)
        start_epoch = point.next_epoch
        check_resume_compatible(hparams, cfg, source, args.ckpt_path, sections=spec.resume_sections)
        if start_epoch >= cfg.trainer.max_epochs:
            raise UserError(f"--ckpt_path {args.ckpt_path} has already trained {start_epoch} epochs and "
                            f"trainer.max_epochs is {cfg.trainer.max_epochs}: pass --max_epochs N with N > {start_epoch} "
                            "to train further.")
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    if not cfg.trainer.deterministic:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    dm, model = spec.build(cfg, hparams)  # reads and checks the data before anything is written
    if hparams is not None:
        dm.check_digest(hparams.get("split_digest"), args.ckpt_path)
    name = args.name or args.cfg_name or (Path(args.config).stem if args.config else spec.model_type)
    shared = os.environ.get(RUN_DIR_ENV) if _launched_rank() else None  # a DDP child: rank 0's directory
    run_dir = (Path(shared) if shared else None) or (
        run_dir_of_checkpoint(Path(args.ckpt_path)) if args.ckpt_path else None) or make_run_dir(args.logdir, name)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the processes Lightning launches for the other ranks
    if not dm.has_validation:
        warnings.warn(f"the validation split is empty ({len(dm.frame)} designs, data.split.val = {cfg.data.split.val}): "
                      "training runs without validation and writes no best checkpoint")
    try:
        setup = build_trainer(cfg, run_dir, use_wandb=args.use_wandb, name=run_dir.name, run_id=args.run_id,
                              validate=dm.has_validation,
                              extra_callbacks=spec.callbacks(cfg, run_dir) if spec.callbacks else [])
    except UserError:
        if not any(run_dir.iterdir()):
            run_dir.rmdir()  # leave no empty run directory behind
        raise
    if not _launched_rank():
        write_config(cfg, run_dir)
        dm.split_frame().to_csv(run_dir / "split.csv", index=False)
        if point is not None:
            dropped = trim_metrics(run_dir / "metrics.csv", point)
            if dropped:
                print(f"metrics.csv: {dropped} row(s) logged after the checkpoint (step {point.global_step}) removed; "
                      "the resumed run logs those epochs again")
    print(f"run directory: {run_dir}")
    if hasattr(dm, "split_summary"):
        print(dm.split_summary)
    last = run_dir / "checkpoints" / "last.ckpt"
    started = time.perf_counter()
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    interrupt = StopOnInterrupt(setup.trainer)
    try:
        with interrupt:
            setup.trainer.fit(model, datamodule=dm, ckpt_path=args.ckpt_path, weights_only=True)
    except SIGTERMException:  # stopped inside an epoch; LastCheckpoint.on_exception saved the last finished step
        return _stopped(getattr(setup.trainer, "interrupt_reason", None) or "SIGTERM", spec, last, setup.trainer)
    except TrainingDiverged as err:
        where = f"{last}" if last.is_file() else "none (it diverged before the first checkpoint)"
        raise TrainingDiverged(f"{err} Last good checkpoint: {where}.") from None
    if setup.trainer.global_rank != 0:
        return 0  # rank 0 plots and evaluates (once, on the whole test split)
    if setup.trainer.interrupted:
        print(f"training interrupted; resume with:\n  {resume_command(spec, last, setup.trainer)}")
        return 130
    reason = getattr(setup.trainer, "interrupt_reason", None)
    if reason and setup.trainer.current_epoch < cfg.trainer.max_epochs:  # stopped at an epoch's end
        print(f"{reason}: saved {last} after epoch {setup.trainer.current_epoch - 1}")
        return _stopped(reason, spec, last, setup.trainer)
    if interrupt.requested:  # Ctrl+C after the last step: training is complete, the evaluation is what is skipped
        print(f"Ctrl+C after the last training step: {last} is complete; evaluate it with:\n"
              f"  python evaluate.py --ckpt {shlex.quote(str(last))}")
        return 130
    seconds = time.perf_counter() - started
    epochs = setup.trainer.current_epoch - start_epoch
    shown = f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.2f}"  # benchmarks parse it: no 0.0 for a short run
    print(f"trained {epochs} epochs in {shown} s ({seconds / max(epochs, 1):.3f} s/epoch)")
    from modules.plotting import plot_training_curves

    for logger in setup.trainer.loggers:
        logger.save()
    plots = plot_training_curves(run_dir / "metrics.csv", run_dir / "plots")
    wandb_run = _wandb_run(setup.trainer)
    if wandb_run is not None:
        _log_images(wandb_run, {f"plots/{p.stem}": p for p in plots})
    if not args.no_eval and len(dm.tensors["test"][0]) == 0:
        print("no evaluation: the test split is empty (data.split.test = 0)")
    elif not args.no_eval:
        try:
            spec.evaluate(model, dm, run_dir / "eval", split="test", wandb_run=wandb_run)
        except KeyboardInterrupt:
            print(f"\nevaluation interrupted; the training is complete ({last}). Evaluate later with:\n"
                  f"  python evaluate.py --ckpt {shlex.quote(str(last))}", file=sys.stderr)
            return 130
    print(f"\ncheckpoints: {last}" + (f" (best: {setup.checkpoint.best_model_path})" if setup.checkpoint.best_model_path else ""))
    print(f"run directory: {run_dir}")
    if wandb_run is not None:
        import wandb

        wandb.finish()
    return 0


def _stopped(reason: str, spec, last: Path, trainer) -> int:
    """A run stopped by Ctrl+C (exit 130) or SIGTERM (143, preemption) after saving `last`: say how to resume."""
    print(f"stopped by {reason}; resume with:\n  {resume_command(spec, last, trainer)}")
    return 130 if reason == "Ctrl+C" else 143


def resume_command(spec, last: Path, trainer=None) -> str:
    """The command that continues a run from `last` (its W&B run too, when it logged to one)."""
    command = f"python {spec.script} --ckpt_path {shlex.quote(str(last))}"
    run = _wandb_run(trainer) if trainer is not None else None
    if run is not None:
        command += f" --use_wandb --run_id {run.id}"
    return command


def _wandb_run(trainer):
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            return logger.experiment
    return None


def _log_images(run, images: dict) -> None:
    try:
        import wandb

        run.log({k: wandb.Image(str(v)) for k, v in images.items()})
    except Exception as err:
        print(f"W&B: could not log images ({err})")

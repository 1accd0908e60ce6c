"""Train the mcLDM's first stage on your own images: a diffusers `AutoencoderKL` (KL-regularised autoencoder,
Rombach et al. 2022, Sec. 3 and App. G), optionally with a PatchGAN discriminator (Esser et al. 2021, Sec. 3.1).

`python train_first_stage.py --cfg_name first_stage_biked_small` trains it with the shared CLI and run directory
(modules/training.py) and, at the end, exports the autoencoder in diffusers format to `<run>/first_stage/`, which an
mcLDM config uses as `first_stage: {pretrained: <run>/first_stage, subfolder: null}`; a complete run (or one with
--export) also copies it to the config's `export_to` (ExportFirstStage has the rules).

Loss, per image x with reconstruction x̂ = D(z), z ~ q(z | x):
    rec(x, x̂) + kl_weight / P · KL(q(z | x) ‖ N(0, I))   [+ λ · (−mean D_φ(x̂)) with the discriminator]
where rec is the per-pixel mean L1 or squared error and P the number of pixels·channels: LDM's objective (sums per
image) divided by P, so `kl_weight` has LDM's meaning (1e-6) and the logged loss reads as a per-pixel error.
λ is `discriminator.weight`, times the adaptive weight ‖∇_L rec‖ / (‖∇_L g‖ + 1e-4) at the decoder's last layer L
(Esser et al. 2021, Eq. 7) when `discriminator.adaptive_weight`. The discriminator minimises the hinge loss
½(mean relu(1 − D_φ(x)) + mean relu(1 + D_φ(x̂))).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from modules.config import (LRSchedulerConfig, OptimizerConfig, TrainerConfig, WandbConfig, build_dataclass,
                            build_lr_scheduler)
from modules.errors import UserError
from modules.image_data import ImageDataConfig, from_model_range

# a small AutoencoderKL: three levels (downsample factor 4), one ResNet block per level; channels are filled in
# from data.channels, the block types from block_out_channels and sample_size from data.image_size
DEFAULT_AUTOENCODER: dict = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
}


@dataclass
class FirstStageLossConfig:
    reconstruction: Literal["l1", "l2"] = "l1"  # per-pixel L1 or squared error
    kl_weight: float = 1e-6  # on the per-image KL, relative to the per-image reconstruction sum (as in LDM)


@dataclass
class DiscriminatorConfig:
    enabled: bool = False
    start_epoch: int = 0  # the adversarial terms switch on at this epoch (0-based)
    weight: float = 0.5  # λ
    adaptive_weight: bool = True  # Esser et al. 2021, Eq. 7
    layers: int = 2  # stride-2 conv layers of the PatchGAN (LDM: 3)
    channels: int = 32  # of the first layer, doubled per layer up to 8× (LDM: 64)
    lr: Optional[float] = None  # default: optimizer.lr


@dataclass
class ReconstructionGridConfig:
    every_n_epochs: int = 1  # 0 = never; <run>/samples/epoch_NNN.png: validation images | reconstructions
    n_images: int = 8


@dataclass
class FirstStageRunConfig:
    model_type: Literal["first_stage"]
    data: ImageDataConfig
    autoencoder: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_AUTOENCODER))  # diffusers AutoencoderKL
    loss: FirstStageLossConfig = field(default_factory=FirstStageLossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, betas=(0.5, 0.9),
                                                                               weight_decay=0.0))
    lr_scheduler: LRSchedulerConfig = field(default_factory=lambda: LRSchedulerConfig(name="none"))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_epochs=20, batch_size=32))
    sample_grid: ReconstructionGridConfig = field(default_factory=ReconstructionGridConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # a stable folder that also receives the export (replaced as a whole, saying so), so an mcLDM config can name
    # it; null = only <run>/first_stage/. Only a complete run writes it: not one shortened below
    # export_min_epochs, stopped early, interrupted or a fast_dev_run, unless export_force
    export_to: Optional[str] = None
    # null: trainer.max_epochs as the config file sets it (filled in when the file is read), so a trial run with
    # `--max_epochs 1` leaves the stable export alone
    export_min_epochs: Optional[int] = None
    export_force: bool = False  # --export: write export_to whatever the run


def autoencoder_config(cfg: FirstStageRunConfig) -> dict:
    """The diffusers config of the autoencoder to train: `cfg.autoencoder` with the channels (data.channels), the
    block types (one plain encoder/decoder block per entry of block_out_channels) and sample_size
    (data.image_size) filled in where not given."""
    config = dict(cfg.autoencoder)
    levels = len(config.get("block_out_channels", [64]))
    config.setdefault("in_channels", cfg.data.channels)
    config.setdefault("out_channels", cfg.data.channels)
    config.setdefault("down_block_types", ["DownEncoderBlock2D"] * levels)
    config.setdefault("up_block_types", ["UpDecoderBlock2D"] * levels)
    config.setdefault("sample_size", cfg.data.image_size)
    return config


def build_autoencoder(cfg: FirstStageRunConfig, source: str = "config"):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL(**autoencoder_config(cfg))
    except (TypeError, ValueError, AttributeError, RuntimeError, KeyError) as err:
        raise UserError(f"{source}: autoencoder is not a valid diffusers AutoencoderKL config ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:240]}). Keys are AutoencoderKL's arguments, e.g. "
                        "block_out_channels, layers_per_block, latent_channels, norm_num_groups.") from None


def check_first_stage_run_config(cfg: FirstStageRunConfig, source: str) -> None:
    """The autoencoder builds and fits the images; loss, discriminator and grid ranges."""
    from modules.training import require

    d = cfg.data
    require(d.value_range == "minus_one_one", source, "data.value_range", "minus_one_one (the first stage works on "
            "images in [-1, 1])", d.value_range)
    for key in ("in_channels", "out_channels"):
        require(cfg.autoencoder.get(key, d.channels) == d.channels, source, f"autoencoder.{key}",
                f"data.channels = {d.channels} (or left out)", cfg.autoencoder.get(key))
    autoencoder = build_autoencoder(cfg, source)
    factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    require(d.image_size % factor == 0, source, "data.image_size",
            f"a multiple of the autoencoder's downsample factor {factor}", d.image_size)
    accumulate = getattr(cfg.trainer, "accumulate_grad_batches", 1)
    require(accumulate == 1, source, "trainer.accumulate_grad_batches", "1 (the first stage steps every batch)",
            accumulate)
    require(cfg.loss.kl_weight >= 0, source, "loss.kl_weight", "≥ 0", cfg.loss.kl_weight)
    g = cfg.discriminator
    require(g.start_epoch >= 0, source, "discriminator.start_epoch", "≥ 0", g.start_epoch)
    require(g.weight >= 0, source, "discriminator.weight", "≥ 0", g.weight)
    require(g.layers >= 1, source, "discriminator.layers", "≥ 1", g.layers)
    require(g.channels >= 1, source, "discriminator.channels", "≥ 1", g.channels)
    require(g.lr is None or g.lr > 0, source, "discriminator.lr", "> 0 or null", g.lr)
    if g.enabled:
        require(d.image_size >= 2 ** g.layers * 8, source, "discriminator.layers",
                f"small enough for {d.image_size} px images (image_size ≥ 8 · 2^layers)", g.layers)
    require(cfg.sample_grid.every_n_epochs >= 0, source, "sample_grid.every_n_epochs", "≥ 0 (0 = never)",
            cfg.sample_grid.every_n_epochs)
    require(cfg.sample_grid.n_images >= 1, source, "sample_grid.n_images", "≥ 1", cfg.sample_grid.n_images)
    require(cfg.export_min_epochs is None or cfg.export_min_epochs >= 0, source, "export_min_epochs",
            "≥ 0 or null (null: the config file's trainer.max_epochs)", cfg.export_min_epochs)
    fill_export_min_epochs(cfg, source)


def fill_export_min_epochs(cfg: FirstStageRunConfig, source: str) -> None:
    """export_min_epochs = trainer.max_epochs as written in the config file, before --max_epochs or --set: the
    check sees the overridden config, so the file is read again. `source` is the file's path, followed by
    " with --set …" when --set changed keys (modules/training.load_run_config); a checkpoint's stored config (a
    resume without a config file) already holds the value its first run filled in."""
    from modules.config import read_yaml

    path = Path(source.split(" with --set ")[0])
    if cfg.export_min_epochs is not None or not path.is_file():
        return
    trainer = read_yaml(path).get("trainer")
    default = FirstStageRunConfig.__dataclass_fields__["trainer"].default_factory().max_epochs
    cfg.export_min_epochs = int(trainer.get("max_epochs", default) if isinstance(trainer, dict) else default)


# --------------------------------------------------------------------------- model


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as used by Esser et al. 2021: 4×4 convolutions, stride 2 for `layers` layers,
    BatchNorm and LeakyReLU(0.2); one realness logit per overlapping patch."""

    def __init__(self, in_channels: int, *, channels: int = 32, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            previous, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            mods += [nn.Conv2d(channels * previous, channels * mult, 4, stride, 1, bias=False),
                     nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2)]
        mods.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():  # pix2pix initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FirstStageModel(pl.LightningModule):
    """Trains a diffusers AutoencoderKL (manual optimisation; a second optimizer for the discriminator)."""

    model_type = "first_stage"

    def __init__(self, *, config: dict, schema: Optional[dict] = None, split_digest: Optional[str] = None):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.cfg = build_dataclass(FirstStageRunConfig, config, source="checkpoint config")
        self.autoencoder = build_autoencoder(self.cfg, "checkpoint config")
        g = self.cfg.discriminator
        self.discriminator = (PatchDiscriminator(self.cfg.data.channels, channels=g.channels, layers=g.layers)
                              if g.enabled else None)

    # ------------------------------------------------------------------ pieces
    def step_generator(self, stream: int = 0) -> torch.Generator:
        """Posterior noise as a function of (seed, stream, global step): a resumed run draws the same numbers."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.cfg.trainer.seed * 1_000_003 + stream) * 1_000_003 + int(self.global_step))
        return gen

    def _adversarial(self) -> bool:
        return self.discriminator is not None and self.current_epoch >= self.cfg.discriminator.start_epoch

    def _reconstruct(self, images: torch.Tensor, generator: torch.Generator):
        posterior = self.autoencoder.encode(images).latent_dist
        return self.autoencoder.decode(posterior.sample(generator=generator)).sample, posterior

    def _losses(self, images: torch.Tensor, reconstruction: torch.Tensor, posterior) -> dict[str, torch.Tensor]:
        error = reconstruction - images
        rec = error.abs().mean() if self.cfg.loss.reconstruction == "l1" else error.pow(2).mean()
        kl = posterior.kl().mean()  # per image, summed over the latent (diffusers' DiagonalGaussianDistribution)
        loss = rec + self.cfg.loss.kl_weight * kl / images[0].numel()
        return {"loss": loss, "reconstruction": rec, "kl": kl}

    def _adaptive_weight(self, rec: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        last = self.autoencoder.decoder.conv_out.weight
        rec_grad = torch.autograd.grad(rec, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        """One optimizer step (and one discriminator step) per batch; a list of batches (`trainer.fused_steps`)
        is several steps in a row."""
        losses = [self._train_one(one[0]) for one in (batch if isinstance(batch, list) else [batch])]
        return {"loss": torch.stack(losses).mean()}

    def _train_one(self, images: torch.Tensor) -> torch.Tensor:
        optimizers = self.optimizers()
        ae_opt, d_opt = (optimizers if isinstance(optimizers, list) else (optimizers, None))[:2]
        reconstruction, posterior = self._reconstruct(images, self.step_generator(0))
        out = self._losses(images, reconstruction, posterior)
        loss = out["loss"]
        adversarial = self._adversarial()
        if adversarial:
            g_loss = -self.discriminator(reconstruction).mean()
            weight = self.cfg.discriminator.weight
            if self.cfg.discriminator.adaptive_weight:
                weight = weight * self._adaptive_weight(out["reconstruction"], g_loss)
            loss = loss + weight * g_loss
            out.update(g_loss=g_loss, d_weight=torch.as_tensor(weight, dtype=loss.dtype))
        ae_opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.cfg.optimizer.gradient_clip_val:
            self.clip_gradients(ae_opt, gradient_clip_val=self.cfg.optimizer.gradient_clip_val)
        ae_opt.step()
        if adversarial:
            real, fake = self.discriminator(images), self.discriminator(reconstruction.detach())
            d_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
            d_opt.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            d_opt.step()
            out["d_loss"] = d_loss
        self._log("train", out, len(images))
        return loss.detach()

    def on_train_epoch_end(self):
        schedulers = self.lr_schedulers()
        for scheduler in (schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []):
            scheduler.step()

    def validation_step(self, batch, batch_idx):
        """The reconstruction and KL terms (no adversarial term): val/loss chooses the best checkpoint."""
        images = batch[0]
        reconstruction, posterior = self._reconstruct(images, self.step_generator(1 + batch_idx))
        out = self._losses(images, reconstruction, posterior)
        error = (reconstruction.clamp(-1, 1) - images)
        out.update(mse=error.pow(2).mean(), l1=error.abs().mean())
        self._log("val", out, len(images))

    def _log(self, stage: str, values: dict, n: int) -> None:
        for key, value in values.items():
            self.log(f"{stage}/{key}", value.detach(), on_step=False, on_epoch=True, batch_size=n,
                     prog_bar=key == "loss")

    def configure_optimizers(self):
        o, s, g = self.cfg.optimizer, self.cfg.lr_scheduler, self.cfg.discriminator

        def adamw(params, lr):
            return torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

        optimizers = [adamw(self.autoencoder.parameters(), o.lr)]
        if self.discriminator is not None:
            optimizers.append(adamw(self.discriminator.parameters(), g.lr or o.lr))
        if s.name == "none":
            return optimizers
        schedulers = [{"scheduler": build_lr_scheduler(opt, s, self.cfg.trainer.max_epochs), "interval": "epoch"}
                      for opt in optimizers]
        return optimizers, schedulers

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # batches are slices of tensors that already live on the device
        if isinstance(batch, tuple) and all(isinstance(t, torch.Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ------------------------------------------------------------------ use
    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (posterior mode) of images in [-1, 1], clamped to [-1, 1]."""
        was_training = self.training
        self.eval()
        z = self.autoencoder.encode(images.to(self.device)).latent_dist.mode()
        out = self.autoencoder.decode(z).sample.clamp(-1.0, 1.0)
        self.train(was_training)
        return out

    @torch.no_grad()
    def latent_scaling_factor(self, images: torch.Tensor, batch_size: int = 64) -> float:
        """1 / std of the posterior means of `images` (LDM's "scale by std"): scaled latents have unit variance."""
        was_training = self.training
        self.eval()
        means = [self.autoencoder.encode(images[i:i + batch_size].to(self.device)).latent_dist.mode().float()
                 for i in range(0, len(images), batch_size)]
        self.train(was_training)
        std = torch.cat(means).std().item()
        return 1.0 / std if std > 0 else 1.0

    def export(self, folder: Path, train_images: torch.Tensor, run_dir: Optional[Path] = None) -> Path:
        """The autoencoder in diffusers format (`save_pretrained`), its scaling factor measured on (up to 512)
        training images, and first_stage_info.json (image size, channels, scaling factor, epoch, when and by which
        run it was exported)."""
        import datetime as dt

        from modules.image_data import to_model_range

        images = to_model_range(train_images[:512], self.cfg.data.value_range)
        scaling = self.latent_scaling_factor(images)
        autoencoder = copy.deepcopy(self.autoencoder).cpu()
        autoencoder.register_to_config(scaling_factor=scaling)
        folder = Path(folder)
        autoencoder.save_pretrained(str(folder))
        info = {"image_size": self.cfg.data.image_size, "channels": self.cfg.data.channels,
                "value_range": self.cfg.data.value_range, "scaling_factor": scaling,
                "epochs": int(self.current_epoch), "global_step": int(self.global_step),
                "exported": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "run_dir": str(run_dir) if run_dir is not None else None}
        (folder / "first_stage_info.json").write_text(json.dumps(info, indent=2))
        return folder


# --------------------------------------------------------------------------- callbacks


def write_reconstruction_grid(model: FirstStageModel, images_uint8: torch.Tensor, path: Path) -> Path:
    """Two rows: the real images, their reconstructions (posterior mode)."""
    from modules.image_data import to_model_range
    from modules.image_evaluation import image_grid

    value_range = model.cfg.data.value_range
    reconstruction = model.reconstruct(to_model_range(images_uint8.to(model.device), value_range))
    path.parent.mkdir(parents=True, exist_ok=True)
    return image_grid([images_uint8.cpu(), from_model_range(reconstruction, value_range).cpu()], path,
                      labels=["real images", "reconstructions (posterior mode)"])


class ReconstructionGridCallback(pl.Callback):
    """Every N epochs (and after the last): <run>/samples/epoch_<NNN>.png, validation images | reconstructions."""

    def __init__(self, run_dir: Path, cfg: ReconstructionGridConfig):
        self.run_dir, self.cfg = Path(run_dir), cfg

    def on_validation_epoch_end(self, trainer, pl_module):
        epoch, every = trainer.current_epoch + 1, self.cfg.every_n_epochs
        if not every or (epoch % every and epoch < trainer.max_epochs):
            return
        dm = trainer.datamodule
        part = "val" if len(dm.tensors["val"][0]) else "train"
        path = write_reconstruction_grid(pl_module, dm.tensors[part][0][: self.cfg.n_images],
                                         self.run_dir / "samples" / f"epoch_{trainer.current_epoch:03d}.png")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                try:
                    import wandb

                    logger.experiment.log({"reconstructions": wandb.Image(str(path)),
                                           "trainer/global_step": trainer.global_step})
                except Exception as err:  # W&B never breaks training
                    print(f"W&B: could not log the reconstruction grid ({err})")


class ExportFirstStage(pl.Callback):
    """At the end of training (and when it is interrupted): <run>/first_stage/ in diffusers format, the config
    line that uses it, and a copy in `export_to` for a complete run only (or with `force`, the --export flag).

    A complete run trained trainer.max_epochs, at least `min_epochs` (the config file's max_epochs: a
    `--max_epochs 1` trial does not count) and is no fast_dev_run. An existing export_to is replaced atomically,
    with a line saying what it held; a folder there that is no first stage is left alone. Files get mode 644,
    folders 755, whatever the umask (safetensors writes 600), so other users and containers can read them."""

    def __init__(self, run_dir: Path, export_to: Optional[str] = None, *, min_epochs: Optional[int] = None,
                 force: bool = False):
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "first_stage"
        self.export_to = Path(export_to) if export_to else None
        self.min_epochs, self.force = min_epochs, force

    def on_train_end(self, trainer, pl_module):
        self._export(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        # the model of the last finished step is still sound (LastCheckpoint, called before, has saved it): the
        # run's own export is written, export_to only with --export
        stopped = ("stopped by SIGTERM" if isinstance(exception, SIGTERMException)
                   else "interrupted" if isinstance(exception, KeyboardInterrupt) else None)
        if stopped:
            try:
                self._export(trainer, pl_module, stopped=stopped)
            except Exception as err:  # never hide the interruption (and its resume line) behind an export error
                print(f"could not export the first stage of the {stopped} run: {type(err).__name__}: {err}")

    def skip_reason(self, trainer, stopped: Optional[str] = None) -> Optional[str]:
        """Why this run is not a complete one (None: it is)."""
        done, planned = int(trainer.current_epoch), int(trainer.max_epochs)
        last = self.run_dir / "checkpoints" / "last.ckpt"
        if stopped:
            return (f"the run was {stopped} in epoch {done + 1} of {planned}; resume it with --ckpt_path {last} "
                    "(it exports when it completes)")
        if trainer.fast_dev_run:
            return "this is a fast_dev_run (a smoke test, not a trained autoencoder)"
        if done < planned:
            return f"the run stopped early, after {done} of {planned} epochs"
        if self.min_epochs is not None and done < self.min_epochs:
            if planned < self.min_epochs:
                return f"--max_epochs {planned} is below the config's {self.min_epochs} (trainer.max_epochs)"
            return f"{done} epochs trained, below export_min_epochs = {self.min_epochs}"
        return None

    def _export(self, trainer, pl_module, stopped: Optional[str] = None) -> None:
        if not trainer.is_global_zero:
            return  # one process writes
        images = trainer.datamodule.tensors["train"][0]
        folder = write_folder_atomically(self.folder, lambda staging: pl_module.export(staging, images, self.run_dir))
        where = f"{folder}"
        if self.export_to is not None:
            reason = self.skip_reason(trainer, stopped)
            if reason and not self.force:
                print(f"\nnot exported to {self.export_to}: {reason}; pass --export to export anyway (or name this "
                      "run's export in the mcLDM config, below)")
            elif self._replace(folder, self.export_to, reason):
                folder = self.export_to
                where += f" and {folder}"
        scaling = json.loads((folder / "first_stage_info.json").read_text())["scaling_factor"]
        print(f"\nfirst stage exported to {where} (scaling factor {scaling:.5f}); use it in an mcLDM config:\n"
              f"  first_stage: {{pretrained: {folder}, subfolder: null}}")

    @staticmethod
    def _replace(folder: Path, target: Path, reason: Optional[str]) -> bool:
        """Copy `folder` to `target`, saying what it replaces; False (and why) when `target` is no first stage."""
        holds_export = target.is_dir() and (target / "config.json").is_file()
        if target.exists() and not holds_export and not (target.is_dir() and not any(target.iterdir())):
            print(f"\nnot exported to {target}: it exists and holds no first stage (no config.json); move it away "
                  "or set export_to to another folder")
            return False
        if reason:
            print(f"\nexporting to {target} as --export asks, although {reason}")
        if holds_export:
            print(f"\nreplacing the existing first stage at {target} ({describe_export(target)})")
        copy_folder_atomically(folder, target)
        return True


def describe_export(folder: Path) -> str:
    """When, how long and by which run an export was trained, from its first_stage_info.json (the file's time for
    exports written before it recorded that)."""
    import datetime as dt

    info_path = Path(folder) / "first_stage_info.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        info = {}
    when = info.get("exported")
    if not when:
        stamp = (info_path if info_path.is_file() else Path(folder) / "config.json").stat().st_mtime
        when = dt.datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds")
    parts = [f"trained {when.replace('T', ' ')}"]
    if "epochs" in info:
        parts.append(f"{info['epochs']} epochs")
    if info.get("run_dir"):
        parts.append(f"run {info['run_dir']}")
    return ", ".join(parts)


def _make_readable(folder: Path) -> None:
    """Files 644, folders 755: an export is for others to read (safetensors and temp files come out 600)."""
    import os

    os.chmod(folder, 0o755)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def write_folder_atomically(target: Path, write) -> Path:
    """Replace the folder `target` by what `write(staging)` writes: written beside it first (then made readable),
    so a crash never leaves half a folder."""
    import os
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    _make_readable(staging)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def copy_folder_atomically(source: Path, target: Path) -> Path:
    """Replace `target` by a copy of `source` (see write_folder_atomically)."""
    import shutil

    return write_folder_atomically(target, lambda staging: shutil.copytree(source, staging))


def first_stage_callbacks(cfg: FirstStageRunConfig, run_dir: Path) -> list:
    grid = [ReconstructionGridCallback(run_dir, cfg.sample_grid)] if cfg.sample_grid.every_n_epochs else []
    return [*grid, ExportFirstStage(run_dir, cfg.export_to, min_epochs=cfg.export_min_epochs, force=cfg.export_force)]


# --------------------------------------------------------------------------- build and evaluate


def build_first_stage(cfg: FirstStageRunConfig, hparams: Optional[dict] = None):
    """(ImageDataModule, FirstStageModel) of a run; BIKED's parametric CSV as images_path renders the sketches."""
    from modules.config import to_dict
    from modules.image_data import resolve_rendered_sketches
    from modules.registry import _image_datamodule

    cfg.data = resolve_rendered_sketches(cfg.data)
    dm = _image_datamodule(cfg, hparams)
    model = FirstStageModel(config=to_dict(cfg), schema=dm.schema.state_dict(), split_digest=dm.split_digest())
    return dm, model


@torch.no_grad()
def evaluate_first_stage(model: FirstStageModel, dm, out_dir: Path, split: str = "test", wandb_run=None,
                         quiet: bool = False, batch_size: int = 64) -> dict:
    """Reconstruction error (posterior mode, clamped to [-1, 1]) on a split: eval/reconstruction.csv,
    eval/reconstructions.png (real | reconstruction) and eval/summary.json; printed unless `quiet`."""
    import pandas as pd

    from modules.evaluation import publish
    from modules.image_data import to_model_range

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = dm.tensors[split][0]
    if len(raw) == 0:
        raise UserError(f"the {split} split is empty; give it a non-zero fraction in data.split.")
    value_range = model.cfg.data.value_range
    sse = sae = 0.0
    for start in range(0, len(raw), batch_size):
        images = to_model_range(raw[start:start + batch_size].to(model.device), value_range)
        error = model.reconstruct(images) - images
        sse += error.double().pow(2).sum().item()
        sae += error.double().abs().sum().item()
    n_values = raw[0].numel() * len(raw)
    mse, l1 = sse / n_values, sae / n_values
    psnr = 10 * torch.log10(torch.tensor(4.0 / mse)).item() if mse > 0 else float("inf")  # peak-to-peak 2 in [-1, 1]
    table = pd.DataFrame([{"split": split, "n_images": len(raw), "mse": mse, "l1": l1, "psnr_db": psnr}])
    table.to_csv(out_dir / "reconstruction.csv", index=False)
    grid = write_reconstruction_grid(model, raw[:8], out_dir / "reconstructions.png")
    latent = (model.autoencoder.config.latent_channels,
              *(s // 2 ** (len(model.autoencoder.config.block_out_channels) - 1) for s in raw.shape[2:]))
    summary = {"split": split, "n_images": int(len(raw)), "mse": mse, "l1": l1, "psnr_db": psnr,
               "value_range": value_range, "latent_shape": list(latent)}
    export = out_dir.parent / "first_stage"
    footer = (f"\nexported first stage: {export}; in an mcLDM config: first_stage: {{pretrained: {export}, "
              "subfolder: null}" if (export / "config.json").is_file() else "")
    publish(out_dir, {"reconstruction": table}, {"reconstructions": grid}, summary, wandb_run=wandb_run, quiet=quiet,
            headings={"reconstruction": f"reconstruction error on the {split} split (posterior mode; pixels in "
                                        "[-1, 1], PSNR for peak-to-peak 2)"}, footer=footer)
    return summary

"""What each model type needs from the shared scripts: its config, how to build/load it, how to evaluate it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from modules.config import build_dataclass
from modules.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    description: str
    config_cls: type
    check: Callable[[Any, str], None]  # (cfg, source): ranges of the model-specific sections
    build: Callable[..., tuple[Any, Any]]  # (cfg, hparams | None) -> (datamodule, model)
    load: Callable[..., tuple[Any, Any]]  # (ckpt path or dict, csv_path | None, with_data) -> (datamodule, model)
    evaluate: Callable[..., Any]  # (model, datamodule, out_dir, split, wandb_run) -> tables
    extra_flags: tuple = ()  # (flag, section, key, help): CLI overrides of this model's train script
    callbacks: Optional[Callable[..., list]] = None  # (cfg, run_dir) -> extra Lightning callbacks
    resume_sections: tuple = ("model", "conditioning")  # config sections a resumed run must not change
    generates: str = "designs"  # "designs" (rows of a CSV) or "images" (what sample.py --out must be)

    @property
    def script(self) -> str:
        """The train script of this model type (train_<model_type>.py), named in resume hints."""
        return f"train_{self.model_type}.py"


# --------------------------------------------------------------------------- mcVAE


def _parametric_datamodule(cfg, hparams: Optional[dict] = None, csv_path: Optional[str] = None):
    """The DataModule of a run; with a checkpoint's hparams it reuses the fitted schema and scaler."""
    from modules.conditioning import ConditionSchema
    from modules.data import MinMaxScaler, ParametricDataModule

    schema = ConditionSchema.from_state(hparams["schema"]) if hparams else None
    scaler = MinMaxScaler.from_state(hparams["design_scaler"]) if hparams else None
    return ParametricDataModule(cfg.data, batch_size=cfg.trainer.batch_size, seed=cfg.trainer.seed,
                                csv_path=csv_path, schema=schema, scaler=scaler, fused_steps=cfg.trainer.fused_steps)


def _build_mcvae(cfg, hparams: Optional[dict] = None):
    from modules.config import to_dict
    from modules.mcvae import MCVAE

    dm = _parametric_datamodule(cfg, hparams)
    model = MCVAE(config=to_dict(cfg), schema=dm.schema.state_dict(), design_scaler=dm.scaler.state_dict(),
                  split_digest=dm.split_digest())
    return dm, model


def _checkpoint_loader(model_cls, config_cls, datamodule_fn):
    """`load(ckpt, csv_path=None, *, with_data=True) -> (DataModule or None, model in eval mode)` for a model type;
    `ckpt` is a path or an already read checkpoint."""

    def load(ckpt: str | Path | dict, csv_path: Optional[str] = None, *, with_data: bool = True):
        from modules.training import read_checkpoint

        checkpoint = ckpt if isinstance(ckpt, dict) else read_checkpoint(ckpt)
        name = "checkpoint" if isinstance(ckpt, dict) else str(ckpt)
        hparams = checkpoint["hyper_parameters"]
        try:
            model = model_cls(**hparams)
            model.load_state_dict(checkpoint["state_dict"])
        except (RuntimeError, KeyError, TypeError, UserError) as err:
            raise UserError(f"{name} does not fit this version's {model_cls.__name__} ({str(err).splitlines()[0][:300]}"
                            " …). It was written by another version of the code; retrain or check out that "
                            "version.") from None
        model.eval()
        if not with_data:
            return None, model
        cfg = build_dataclass(config_cls, hparams["config"], source=f"{name} (stored config)")
        dm = datamodule_fn(cfg, hparams, csv_path=csv_path)
        dm.check_digest(hparams.get("split_digest"), name)  # refuses data other than the training data
        return dm, model

    return load


def _evaluate_parametric(model, dm, out_dir, split="test", wandb_run=None, quiet=False):
    from modules.evaluation import evaluate_parametric

    return evaluate_parametric(model, dm, out_dir, split=split, wandb_run=wandb_run, quiet=quiet)


def _mcvae_spec() -> ModelSpec:
    from modules.mcvae import MCVAERunConfig, check_mcvae_config

    from modules.mcvae import MCVAE

    return ModelSpec("mcvae", "Train an mcVAE on parametric designs (MLP VAE with masked conditions).",
                     MCVAERunConfig, check_mcvae_config, _build_mcvae,
                     _checkpoint_loader(MCVAE, MCVAERunConfig, _parametric_datamodule), _evaluate_parametric)


MCVAE_SPEC = _mcvae_spec()


# --------------------------------------------------------------------------- conv-mcVAE

IMAGES_PATH_FLAG = ("--images_path", "data", "images_path", "image folder (overrides data.images_path); a BIKED "
                    "parametric CSV instead is rendered into a cache of sketches first")


def _image_datamodule(cfg, hparams: Optional[dict] = None, csv_path: Optional[str] = None):
    from modules.conditioning import ConditionSchema
    from modules.image_data import ImageDataModule

    if csv_path:
        cfg.data.csv_path = csv_path
    schema = ConditionSchema.from_state(hparams["schema"]) if hparams else None
    return ImageDataModule(cfg.data, batch_size=cfg.trainer.batch_size, seed=cfg.trainer.seed, schema=schema,
                           fused_steps=cfg.trainer.fused_steps)


def _build_conv_mcvae(cfg, hparams: Optional[dict] = None):
    from modules.config import to_dict
    from modules.conv_mcvae import ConvMCVAE
    from modules.image_data import resolve_rendered_sketches

    cfg.data = resolve_rendered_sketches(cfg.data)
    dm = _image_datamodule(cfg, hparams)
    model = ConvMCVAE(config=to_dict(cfg), schema=dm.schema.state_dict(), split_digest=dm.split_digest())
    return dm, model


def _evaluate_images(model, dm, out_dir, split="test", wandb_run=None, quiet=False):
    from modules.image_evaluation import evaluate_images

    return evaluate_images(model, dm, out_dir, split=split, wandb_run=wandb_run, quiet=quiet)


def _image_callbacks(cfg, run_dir):
    from modules.image_evaluation import SampleGridCallback

    return [SampleGridCallback(run_dir, cfg.sample_grid)] if cfg.sample_grid.every_n_epochs else []


def _conv_mcvae_spec() -> ModelSpec:
    from modules.conv_mcvae import ConvMCVAE, ConvMCVAERunConfig, check_conv_mcvae_config

    return ModelSpec("conv_mcvae", "Train a conv-mcVAE on images (convolutional VAE with masked conditions).",
                     ConvMCVAERunConfig, check_conv_mcvae_config, _build_conv_mcvae,
                     _checkpoint_loader(ConvMCVAE, ConvMCVAERunConfig, _image_datamodule), _evaluate_images,
                     extra_flags=(IMAGES_PATH_FLAG,),
                     callbacks=_image_callbacks, generates="images")


CONV_MCVAE_SPEC = _conv_mcvae_spec()
# --------------------------------------------------------------------------- mcLDM


def _first_stage_for(cfg, source: str):
    """The frozen first stage of an mcLDM config, on the GPU when training will use one (encoding is faster)."""
    import torch

    from modules.diffusion_components.first_stage import FirstStage

    first_stage = FirstStage.from_config(cfg.first_stage, source=source)
    if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        first_stage.to("cuda")
    return first_stage


def _latent_datamodule(cfg, hparams: Optional[dict] = None, csv_path: Optional[str] = None, first_stage=None):
    from modules.conditioning import ConditionSchema
    from modules.diffusion_components.latents import LatentDataModule

    if csv_path:
        cfg.data.csv_path = csv_path
    first_stage = first_stage or _first_stage_for(cfg, "the checkpoint's config" if hparams else "the config")
    schema = ConditionSchema.from_state(hparams["schema"]) if hparams else None
    dm = LatentDataModule(cfg.data, first_stage, batch_size=cfg.trainer.batch_size, seed=cfg.trainer.seed,
                          schema=schema, accumulate=cfg.trainer.accumulate_grad_batches,
                          encode_batch_size=cfg.speed.generation_batch_size)
    dm.first_stage = first_stage
    return dm


def _build_mcldm(cfg, hparams: Optional[dict] = None):
    from modules.config import to_dict
    from modules.image_data import resolve_rendered_sketches
    from modules.mcldm import MCLDM, check_latent_fits_unet

    first_stage = _first_stage_for(cfg, "the config")  # before rendering: missing weights fail fast
    cfg.data = resolve_rendered_sketches(cfg.data)
    latent_shape = first_stage.latent_shape(cfg.data.image_size)
    check_latent_fits_unet(latent_shape, cfg, "the config")
    dm = _latent_datamodule(cfg, hparams, first_stage=first_stage)
    model = MCLDM(config=to_dict(cfg), schema=dm.schema.state_dict(), latent_shape=latent_shape,
                  first_stage_fingerprint=first_stage.fingerprint(), split_digest=dm.split_digest())
    model.attach_first_stage(first_stage)
    return dm, model


def _mcldm_spec() -> ModelSpec:
    from modules.mcldm import MCLDM, MCLDMRunConfig, check_mcldm_config

    load_checkpoint = _checkpoint_loader(MCLDM, MCLDMRunConfig, _latent_datamodule)

    def load(ckpt, csv_path: Optional[str] = None, *, with_data: bool = True):
        dm, model = load_checkpoint(ckpt, csv_path, with_data=with_data)
        if dm is not None:
            model.attach_first_stage(dm.first_stage)  # loaded once, for the latents and for decoding
        return dm, model

    return ModelSpec("mcldm", "Train an mcLDM: latent diffusion with masked conditions on a frozen AutoencoderKL.",
                     MCLDMRunConfig, check_mcldm_config, _build_mcldm, load, _evaluate_images,
                     extra_flags=(IMAGES_PATH_FLAG,),
                     callbacks=_image_callbacks, resume_sections=("unet", "conditioning", "first_stage"),
                     generates="images")


MCLDM_SPEC = _mcldm_spec()
SPECS = {spec.model_type: spec for spec in (MCVAE_SPEC, CONV_MCVAE_SPEC, MCLDM_SPEC)}


# --------------------------------------------------------------------------- first stage of the mcLDM


# a switch (the config key is a bool) setting the top-level key export_force (section None)
EXPORT_FLAG = ("--export", None, "export_force", "copy the autoencoder to export_to even when this run is not a "
               "complete one (--max_epochs below the config's, stopped early, interrupted); it replaces what is "
               "there, saying so")


def _first_stage_spec() -> ModelSpec:
    """train_first_stage.py's model (an autoencoder, no conditions). Not in SPECS: sample.py has nothing to sample
    from it; its checkpoints load with FIRST_STAGE_SPEC.load and its export with FirstStage.from_config."""
    from modules.first_stage_training import (FirstStageModel, FirstStageRunConfig, build_first_stage,
                                              check_first_stage_run_config, evaluate_first_stage,
                                              first_stage_callbacks)

    return ModelSpec("first_stage", "Train the mcLDM's first stage: a diffusers AutoencoderKL on your images.",
                     FirstStageRunConfig, check_first_stage_run_config, build_first_stage,
                     _checkpoint_loader(FirstStageModel, FirstStageRunConfig, _image_datamodule), evaluate_first_stage,
                     extra_flags=(IMAGES_PATH_FLAG, EXPORT_FLAG),
                     callbacks=first_stage_callbacks, resume_sections=("autoencoder", "loss", "discriminator"))


FIRST_STAGE_SPEC = _first_stage_spec()


def spec_for(checkpoint: dict, name: str = "checkpoint") -> ModelSpec:
    """The model type that wrote a checkpoint (read with `modules.training.read_checkpoint`)."""
    model_type = checkpoint["hyper_parameters"]["config"].get("model_type")
    if model_type not in SPECS:
        raise UserError(f"{name} holds a '{model_type}' model; this version knows {', '.join(SPECS)}.")
    return SPECS[model_type]

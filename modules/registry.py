"""What each model type needs from the shared scripts: its config, how to build/load it, how to evaluate it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd
import torch

from modules.config import build_dataclass
from modules.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    description: str
    config_cls: type
    build: Callable[..., tuple[Any, Any]]  # (cfg, hparams | None) -> (datamodule, model)
    load: Callable[..., tuple[Any, Any]]  # (ckpt_path, csv_path | None) -> (datamodule, model)
    evaluate: Callable[..., Any]  # (model, datamodule, out_dir, split, wandb_run) -> tables


# --------------------------------------------------------------------------- mcVAE


def _build_mcvae(cfg, hparams: Optional[dict] = None, csv_path: Optional[str] = None):
    from modules.conditioning import ConditionSchema
    from modules.config import to_dict
    from modules.data import MinMaxScaler, ParametricDataModule
    from modules.mcvae import MCVAE

    schema = ConditionSchema.from_state(hparams["schema"]) if hparams else None
    scaler = MinMaxScaler.from_state(hparams["design_scaler"]) if hparams else None
    dm = ParametricDataModule(cfg.data, batch_size=cfg.trainer.batch_size, seed=cfg.trainer.seed,
                              csv_path=csv_path, schema=schema, scaler=scaler, fused_steps=cfg.trainer.fused_steps)
    model = MCVAE(config=to_dict(cfg), schema=dm.schema.state_dict(), design_scaler=dm.scaler.state_dict())
    return dm, model


def _load_mcvae(ckpt_path: str | Path, csv_path: Optional[str] = None, *, with_data: bool = True):
    from modules.mcvae import MCVAE, MCVAERunConfig
    from modules.training import load_checkpoint_hparams

    hparams = load_checkpoint_hparams(ckpt_path)
    try:
        model = MCVAE.load_from_checkpoint(str(ckpt_path), map_location="cpu", weights_only=True)
    except (RuntimeError, KeyError, UserError) as err:
        raise UserError(f"checkpoint {ckpt_path} does not fit this version's mcVAE ({str(err).splitlines()[0][:300]} "
                        f"…). It was written by another version of the code; retrain or check out that version.") from None
    model.eval()
    if not with_data:
        return None, model
    cfg = build_dataclass(MCVAERunConfig, hparams["config"], source=f"{ckpt_path} (stored config)")
    dm, _ = _build_mcvae(cfg, hparams, csv_path=csv_path)
    return dm, model


def _evaluate_parametric(model, dm, out_dir, split="test", wandb_run=None, quiet=False):
    from modules.evaluation import evaluate_parametric

    return evaluate_parametric(model, dm, out_dir, split=split, wandb_run=wandb_run, quiet=quiet)


def _mcvae_spec() -> ModelSpec:
    from modules.mcvae import MCVAERunConfig

    return ModelSpec("mcvae", "Train an mcVAE on parametric designs (MLP VAE with masked conditions).",
                     MCVAERunConfig, _build_mcvae, _load_mcvae, _evaluate_parametric)


MCVAE_SPEC = _mcvae_spec()
SPECS = {MCVAE_SPEC.model_type: MCVAE_SPEC}


def spec_for_checkpoint(ckpt_path: str | Path) -> ModelSpec:
    from modules.training import load_checkpoint_hparams

    model_type = load_checkpoint_hparams(ckpt_path)["config"].get("model_type")
    if model_type not in SPECS:
        raise UserError(f"checkpoint {ckpt_path} holds a '{model_type}' model; this version knows {', '.join(SPECS)}.")
    return SPECS[model_type]

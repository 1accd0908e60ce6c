"""First-stage latents of an image data set: computed once, cached as safetensors, served like images."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from modules.conditioning import ConditionSchema
from modules.data import SPLITS
from modules.diffusion_components.first_stage import FirstStage
from modules.image_data import ImageDataConfig, ImageDataModule

log = logging.getLogger(__name__)
LATENT_CACHE_VERSION = 1


def latent_cache_path(images: torch.Tensor, first_stage: FirstStage, cfg: ImageDataConfig) -> Path:
    """<cache dir>/latents_<key>.safetensors, the key over the image bytes, the image size and the first stage."""
    h = hashlib.sha256(f"{LATENT_CACHE_VERSION}|{cfg.image_size}|{first_stage.fingerprint()}".encode())
    h.update(images.contiguous().numpy().tobytes())
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.images_path) / ".cache"
    return cache_dir / f"latents_{h.hexdigest()[:20]}.safetensors"


def cached_latents(images: torch.Tensor, first_stage: FirstStage, cfg: ImageDataConfig, *, batch_size: int = 32,
                   progress: bool = True) -> torch.Tensor:
    """float32 latents (N, C, h, w) of uint8 images: from the cache when it holds them, else encoded (with a
    progress bar) and cached atomically."""
    from safetensors.torch import load_file, save_file

    path = latent_cache_path(images, first_stage, cfg)
    if path.is_file():
        try:
            latents = load_file(str(path))["latents"]
            if latents.shape[0] == images.shape[0]:
                log.info("latents from %s", path)
                return latents
        except Exception as err:  # a damaged cache is rebuilt, not trusted
            log.warning("latent cache %s unreadable (%s); encoding again", path, err)
    latents = first_stage.encode_batched(images, batch_size=batch_size, progress=progress).contiguous()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"latents": latents}, str(tmp))
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write the latent cache %s (%s); latents are encoded again next time", path, err)
    return latents


class LatentDataModule(ImageDataModule):
    """The image data set with each image replaced by its first-stage latent for training; the uint8 images stay
    available (`self.images`, `split_images`) for sample grids and evaluation."""

    def __init__(self, cfg: ImageDataConfig, first_stage: FirstStage, *, batch_size: int, seed: int = 0,
                 schema: Optional[ConditionSchema] = None, progress: bool = True, accumulate: int = 1,
                 encode_batch_size: int = 32):
        super().__init__(cfg, batch_size=batch_size, seed=seed, schema=schema, progress=progress,
                         accumulate=accumulate)
        self.latents = cached_latents(self.images, first_stage, cfg, batch_size=encode_batch_size, progress=progress)
        self.image_tensors = self.tensors
        self.tensors = {}
        for name in SPLITS:
            rows = torch.from_numpy(np.flatnonzero(self.assignment == name))
            _, cat, num = self.image_tensors[name]
            self.tensors[name] = (self.latents.index_select(0, rows), cat, num)

    def split_images(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(uint8 images, categorical, numerical) of a split."""
        return self.image_tensors[name]

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch  # latents are already float

"""The mcLDM's first stage: a frozen diffusers `AutoencoderKL` that maps images to latents and back.

The paper uses Stable Diffusion 2.1's VAE (`stabilityai/stable-diffusion-2-1`, subfolder `vae`). Without network
access point `first_stage.pretrained` at a local copy in diffusers format, train one on your own images with
`train_first_stage.py`, or give `first_stage.config` for a randomly initialised autoencoder (tests).

Downloads: a `pretrained` that is not an existing folder is a hub id; it is looked up in the local Hugging Face cache
only (`local_files_only=True`, so no run hangs on the network) unless the environment sets
`MCLDM_ALLOW_DOWNLOAD=1`. `HF_HUB_OFFLINE=1` always wins.

Latents are the posterior *mode* (the mean of q(z | x)) times the scaling factor (minus the shift factor for VAEs
that define one): deterministic, so cached latents do not depend on a random draw.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from modules.errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DOWNLOAD_ENV = "MCLDM_ALLOW_DOWNLOAD"
PAPER_VAE = "stabilityai/stable-diffusion-2-1"

# A tiny AutoencoderKL (≈ 0.66 M parameters, downsample factor 2, builds in milliseconds) for tests and CPU experiments.
TINY_AUTOENCODER_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
}


# The architecture of Stable Diffusion 2.1's VAE (its vae/config.json): 83.7 M parameters, 8× downsampling. With
# random weights it costs what the real one costs: benchmarks/bench_mcldm.py times decoding with it.
SD21_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}


@dataclass
class FirstStageConfig:
    pretrained: Optional[str] = PAPER_VAE  # hub id or local folder (diffusers format)
    subfolder: Optional[str] = "vae"  # null when config.json lies directly in `pretrained`
    # a randomly initialised AutoencoderKL from this diffusers config instead (tests); `pretrained` is then ignored.
    # Seeded: the same config always gives the same weights (and the same fingerprint).
    config: Optional[dict] = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # fp16 VAEs (SDXL's) produce NaNs: fp32 default
    scaling_factor: Optional[float] = None  # default: from the autoencoder's config (0.18215 for SD VAEs)


def check_first_stage_config(cfg: FirstStageConfig, source: str, key: str = "first_stage") -> None:
    """Relations types alone do not catch (call from a run config's check)."""
    if cfg.config is None and not cfg.pretrained:
        raise UserError(f"{source}: {key} needs either pretrained (a hub id or a local folder in diffusers format) "
                        f"or config (a diffusers AutoencoderKL config for random weights).")
    if cfg.scaling_factor is not None and not cfg.scaling_factor > 0:
        raise UserError(f"{source}: {key}.scaling_factor must be > 0 or null, got {cfg.scaling_factor!r}.")


def _missing_weights_error(cfg: FirstStageConfig, source: str, reason: str, *, hub_id: bool) -> UserError:
    where = cfg.pretrained + (f" (subfolder {cfg.subfolder})" if cfg.subfolder else "")
    offline = "" if not hub_id or os.environ.get(DOWNLOAD_ENV) == "1" else (
        f" It is no local folder, so it was looked up as a hub id in the local Hugging Face cache only (set "
        f"{DOWNLOAD_ENV}=1 to allow a download).")
    return UserError(
        f"{source}: first_stage.pretrained = {cfg.pretrained!r}: the autoencoder cannot be loaded from {where} "
        f"({reason}).{offline} Point at a local copy: download it on a machine with network access, e.g. "
        f"`huggingface-cli download {PAPER_VAE} --include 'vae/*' --local-dir DIR`, copy DIR here and set "
        "`first_stage: {pretrained: DIR, subfolder: vae}` (subfolder: null when config.json lies directly in DIR); "
        "or train a first stage on your own images with `python train_first_stage.py --cfg_name "
        "first_stage_biked_small` and use the folder it prints; or set `first_stage: {config: {...}}` (a diffusers "
        "AutoencoderKL config) for randomly initialised weights.")


def _load_pretrained(cfg: FirstStageConfig, source: str):
    from diffusers import AutoencoderKL
    from huggingface_hub.errors import HfHubHTTPError

    local_dir = Path(cfg.pretrained).expanduser()
    is_dir = local_dir.is_dir()
    if not is_dir and (cfg.pretrained.startswith(("/", ".", "~")) or cfg.pretrained.count("/") > 1):
        raise _missing_weights_error(cfg, source, "no such folder", hub_id=False)  # a path, not a hub id
    kwargs = {"local_files_only": not is_dir and os.environ.get(DOWNLOAD_ENV) != "1", "low_cpu_mem_usage": False,
              "torch_dtype": DTYPES[cfg.dtype]}
    if cfg.subfolder:
        kwargs["subfolder"] = cfg.subfolder
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return AutoencoderKL.from_pretrained(str(local_dir) if is_dir else cfg.pretrained, **kwargs)
    except (OSError, ValueError, RuntimeError, HfHubHTTPError) as err:  # OSError = EnvironmentError
        reason = " ".join(str(err).split())[:240] or type(err).__name__
        raise _missing_weights_error(cfg, source, reason, hub_id=not is_dir) from None


def _build_random(config: dict, source: str):
    from diffusers import AutoencoderKL

    try:
        with torch.random.fork_rng(devices=[]):  # the same config → the same weights, without touching global RNG
            torch.manual_seed(0)
            return AutoencoderKL(**config)
    except (TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise UserError(f"{source}: first_stage.config is not a valid diffusers AutoencoderKL config "
                        f"({type(err).__name__}: {' '.join(str(err).split())[:240]}). See "
                        "modules.diffusion_components.first_stage.TINY_AUTOENCODER_CONFIG for an example.") from None


class FirstStage(nn.Module):
    """A frozen `AutoencoderKL`: `encode` images in [-1, 1] to scaled latents, `decode` latents to images.

    The autoencoder never trains: its parameters do not require gradients and it stays in eval mode when a parent
    module is put into training mode.
    """

    def __init__(self, autoencoder, *, dtype: str = "float32", scaling_factor: Optional[float] = None):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype_name = dtype
        self.autoencoder = nn.Module.to(autoencoder, DTYPES[dtype])  # (diffusers' own .to() warns about any cast)
        self.autoencoder.requires_grad_(False)
        config = self.autoencoder.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None
                                    else getattr(config, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self._fingerprint: Optional[str] = None
        self.register_load_state_dict_post_hook(self._forget_fingerprint)
        self.train(False)

    @classmethod
    def from_config(cls, cfg: FirstStageConfig, *, source: str = "config") -> "FirstStage":
        """Load (or, with `cfg.config`, build seeded random) weights; a `UserError` naming `first_stage.pretrained`
        and `source` when they are not available."""
        check_first_stage_config(cfg, source)
        autoencoder = _build_random(cfg.config, source) if cfg.config is not None else _load_pretrained(cfg, source)
        return cls(autoencoder, dtype=cfg.dtype, scaling_factor=cfg.scaling_factor)

    def _forget_fingerprint(self, module, incompatible_keys) -> None:
        self._fingerprint = None  # new weights were loaded

    def train(self, mode: bool = True) -> "FirstStage":
        return super().train(False)  # frozen: always eval (no dropout; GroupNorm has no running statistics anyway)

    # ------------------------------------------------------------------ shapes
    @property
    def in_channels(self) -> int:
        return int(self.autoencoder.config.in_channels)

    @property
    def out_channels(self) -> int:
        return int(self.autoencoder.config.out_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    def latent_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the latents of `image_size` images (an int for square images, or (H, W))."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self._check_size(h, w)
        f = self.downsample_factor
        return self.latent_channels, h // f, w // f

    def _check_size(self, h: int, w: int) -> None:
        f = self.downsample_factor
        if h % f or w % f:
            raise UserError(f"images of {h}×{w} pixels do not fit the first stage: height and width must be multiples "
                            f"of its downsample factor {f}. Set data.image_size to a multiple of {f}.")

    @staticmethod
    def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
        """Grayscale → RGB by repeating the channel, RGB → grayscale by averaging."""
        if x.shape[1] == channels:
            return x
        if x.shape[1] == 1:
            return x.expand(-1, channels, -1, -1)
        if channels == 1:
            return x.mean(dim=1, keepdim=True)
        raise UserError(f"the first stage works on 1- or {channels}-channel images, got {x.shape[1]} channels.")

    # ------------------------------------------------------------------ encode / decode
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images float in [-1, 1], (B, C, H, W) with C = 1 or 3 → float32 latents (B, latent_channels, H/f, W/f):
        the posterior mode (mean), shifted and scaled."""
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        self._check_size(*images.shape[2:])
        x = self._match_channels(images.to(self.device, self.dtype), self.in_channels)
        mean = self.autoencoder.encode(x).latent_dist.mode()
        latents = ((mean.float() - self.shift_factor) * self.scaling_factor)
        if not torch.isfinite(latents).all():
            raise UserError(f"the first stage produced NaN/inf latents in {self.dtype_name} (half-precision VAEs "
                            "such as SDXL's overflow). Use `first_stage.dtype: float32`.")
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, channels: int) -> torch.Tensor:
        """Scaled latents → float32 images in [-1, 1] with `channels` channels (1: the mean of RGB)."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        images = self.autoencoder.decode(z.to(self.dtype)).sample.float().clamp(-1.0, 1.0)
        return self._match_channels(images, channels)

    def encode_batched(self, images: torch.Tensor, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
        """`encode` over a whole set in batches: uint8 images (0…255) or float images in [-1, 1]; float32 latents
        on the CPU."""
        from tqdm import tqdm

        out = []
        for start in tqdm(range(0, len(images), batch_size), desc="encoding latents", unit="batch",
                          disable=not progress):
            batch = images[start:start + batch_size].to(self.device)
            if batch.dtype == torch.uint8:
                batch = batch.float() / 127.5 - 1.0
            out.append(self.encode(batch).cpu())
        if not out:
            return torch.empty((0, *self.latent_shape(tuple(images.shape[2:]))))
        return torch.cat(out)

    def decode_batched(self, latents: torch.Tensor, channels: int, batch_size: int = 32,
                       progress: bool = False) -> torch.Tensor:
        """`decode` in batches; float32 images in [-1, 1] on the CPU."""
        from tqdm import tqdm

        out = [self.decode(latents[s:s + batch_size], channels).cpu()
               for s in tqdm(range(0, len(latents), batch_size), desc="decoding", unit="batch", disable=not progress)]
        return torch.cat(out) if out else torch.empty((0, channels, 0, 0))

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """sha256 (16 hex digits) over the autoencoder's config, the dtype, the scaling and shift factors and every
        parameter's bytes: latents cached under it are never served for another first stage. Computed once (the
        weights are frozen) and again after `load_state_dict`."""
        if self._fingerprint is None:
            config = {k: v for k, v in dict(self.autoencoder.config).items() if not k.startswith("_")}
            h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
            h.update(f"{self.dtype_name}|{self.scaling_factor!r}|{self.shift_factor!r}".encode())
            for name, tensor in self.autoencoder.state_dict().items():
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

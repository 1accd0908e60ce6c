"""Image data: a folder of images and a CSV of conditions joined on an id column, cached as one tensor file."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from modules.conditioning import ConditionSchema
from modules.config import ConditionSpec, SplitConfig
from modules.data import SPLITS, ConditionedDataModule, check_unique_ids
from modules.errors import UserError

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when the cached format or the resizing changes


@dataclass
class ImageDataConfig:
    images_path: str  # folder of images
    csv_path: str  # conditions, one row per image
    id_column: str  # joins the CSV to the images: <images_path>/<image_template with {id}>
    conditions: list[ConditionSpec]
    image_template: str = "{id}.png"
    vocabularies: dict[str, list] = field(default_factory=dict)
    split: SplitConfig = field(default_factory=SplitConfig)
    image_size: int = 64  # square; every image is resized to image_size × image_size
    channels: Literal[1, 3] = 1  # 1 = grayscale, 3 = RGB
    value_range: Literal["minus_one_one", "zero_one"] = "minus_one_one"
    cache_dir: Optional[str] = None  # default: <images_path>/.cache
    missing_images: Literal["error", "skip"] = "error"  # rows without a readable image: stop, or drop and log


def _image_paths(frame: pd.DataFrame, cfg: ImageDataConfig) -> list[Path]:
    folder = Path(cfg.images_path)
    return [folder / cfg.image_template.format(id=i) for i in frame[cfg.id_column].tolist()]


def _check_images(frame: pd.DataFrame, cfg: ImageDataConfig) -> pd.DataFrame:
    """Rows whose image exists and opens; per `missing_images`, an error naming them or a logged skip."""
    paths = _image_paths(frame, cfg)
    bad: list[tuple[Path, str]] = []
    sizes = {}
    for path in paths:
        if not path.is_file():
            bad.append((path, "missing"))
            continue
        try:
            with Image.open(path) as image:
                sizes[path] = (image.size, image.mode)
        except (UnidentifiedImageError, OSError) as err:
            bad.append((path, f"unreadable ({type(err).__name__})"))
    if bad and cfg.missing_images == "error":
        examples = "; ".join(f"{p} {why}" for p, why in bad[:3])
        raise UserError(f"{len(bad)} of {len(paths)} rows of {cfg.csv_path} have no readable image ({examples}). "
                        "Fix the files, or set data.missing_images: skip to drop those rows (they are logged).")
    if bad:
        log.warning("skipping %d rows without a readable image: %s", len(bad), ", ".join(str(p) for p, _ in bad[:10]))
    unusable = {p for p, _ in bad}
    keep = np.array([p not in unusable for p in paths])
    first_of_size: dict[tuple[int, int], Path] = {}
    for path, (size, _) in sizes.items():
        first_of_size.setdefault(size, path)
    if len(first_of_size) > 1:
        (a, path_a), (b, path_b) = list(first_of_size.items())[:2]
        raise UserError(f"the images in {cfg.images_path} have mixed sizes ({path_a} is {a[0]}×{a[1]}, {path_b} is "
                        f"{b[0]}×{b[1]}); give them one size (they are then resized to data.image_size = "
                        f"{cfg.image_size}).")
    return frame[keep].reset_index(drop=True)


def _cache_key(paths: list[Path], cfg: ImageDataConfig) -> str:
    """Changes with any file (name, size, modification time), the size, the channels and the cache version."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, cfg.image_size, cfg.channels]).encode())
    for path in paths:
        stat = path.stat()
        h.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _read(path: Path, size: int, channels: int) -> np.ndarray:
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")  # mixed modes are converted, not refused
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.LANCZOS)
        array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def load_images(paths: list[Path], cfg: ImageDataConfig, *, progress: bool = True) -> torch.Tensor:
    """uint8 (N, C, S, S) images, read once and then served from a safetensors cache keyed by the inputs."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.images_path) / ".cache"
    cache = cache_dir / f"images_{_cache_key(paths, cfg)}.safetensors"
    if cache.is_file():
        try:
            images = load_file(str(cache))["images"]
            if images.shape[0] == len(paths):
                return images
        except Exception as err:  # a damaged cache is rebuilt, not trusted
            log.warning("image cache %s unreadable (%s); rebuilding", cache, err)
    images = np.empty((len(paths), cfg.channels, cfg.image_size, cfg.image_size), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc="reading images", unit="img", disable=not progress)):
        images[i] = _read(path, cfg.image_size, cfg.channels)
    tensor = torch.from_numpy(images)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        save_file({"images": tensor}, str(tmp))
        os.replace(tmp, cache)  # atomic: a crash never leaves a half-written cache
    except OSError as err:
        log.warning("could not write the image cache %s (%s); images are read again next time", cache, err)
    return tensor


def resolve_rendered_sketches(cfg: ImageDataConfig) -> ImageDataConfig:
    """`images_path` naming a BIKED parametric CSV: render its sketches once into data/.cache and use them."""
    from dataclasses import replace

    from modules.render import render_dataset

    source = Path(cfg.images_path)
    if source.is_file() and source.suffix.lower() == ".csv":
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
        folder = Path("data") / ".cache" / f"sketches_{digest}_{cfg.image_size}"
        table = folder / "conditions.csv"
        if not table.is_file():  # written last: a missing table means an unfinished render
            log.warning("rendering the sketches of %s into %s", source, folder)
            render_dataset(source, folder, size=cfg.image_size, workers=os.cpu_count() or 1)
        return replace(cfg, images_path=str(folder), csv_path=str(table), id_column="Bike index",
                       image_template="{id}.png")
    if not source.is_dir():
        raise UserError(f"image folder {source} does not exist. Render the BIKED sketches with `python -m "
                        f"modules.render --csv data/biked/df_parameters_final.csv --out {source} --size "
                        f"{cfg.image_size}`, or pass --images_path data/biked/df_parameters_final.csv to render them "
                        "on the fly.")
    return cfg


def to_model_range(images: torch.Tensor, value_range: str) -> torch.Tensor:
    """uint8 → float in [-1, 1] or [0, 1]."""
    x = images.float() / 255.0
    return x * 2.0 - 1.0 if value_range == "minus_one_one" else x


def from_model_range(images: torch.Tensor, value_range: str) -> torch.Tensor:
    """float in the model's range → uint8."""
    x = (images + 1.0) / 2.0 if value_range == "minus_one_one" else images
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)


class ImageDataModule(ConditionedDataModule):
    """Images (uint8 on the device, scaled per batch) and their conditions, split as the parametric data."""

    def __init__(self, cfg: ImageDataConfig, *, batch_size: int, seed: int = 0,
                 schema: Optional[ConditionSchema] = None, progress: bool = True, fused_steps: int = 1,
                 accumulate: int = 1):
        super().__init__(batch_size=batch_size, seed=seed, fused_steps=fused_steps, accumulate=accumulate)
        self.cfg = cfg
        self.csv_path = cfg.csv_path
        frame = self._read_table()
        frame = _check_images(frame, cfg)
        self._split_and_fit(frame, cfg, str(self.csv_path), schema)
        self.paths = _image_paths(self.frame, cfg)
        self.images = load_images(self.paths, cfg, progress=progress)
        for name in SPLITS:
            rows = torch.from_numpy(np.flatnonzero(self.assignment == name))
            cat, num = self.schema.encode(self.frame.iloc[rows.numpy()], source=str(self.csv_path))
            self.tensors[name] = (self.images.index_select(0, rows), cat, num)

    def split_images(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(uint8 images, categorical, numerical) of a split."""
        return self.tensors[name]

    def _read_table(self) -> pd.DataFrame:
        cfg = self.cfg
        path = Path(cfg.csv_path)
        if not path.is_file():
            raise UserError(f"conditions file {path} does not exist; set data.csv_path (for rendered BIKED sketches: "
                            "<sketch folder>/conditions.csv from `python -m modules.render`).")
        if not Path(cfg.images_path).is_dir():
            raise UserError(f"image folder {cfg.images_path} does not exist; set data.images_path (or render the "
                            "BIKED sketches: python -m modules.render --csv ... --out FOLDER).")
        categorical = [c.name for c in cfg.conditions if c.kind == "categorical"]
        frame = pd.read_csv(path, dtype={c: str for c in categorical})
        missing = [c for c in [cfg.id_column] + [c.name for c in cfg.conditions] if c not in frame.columns]
        if missing:
            raise UserError(f"{path}: column(s) {', '.join(repr(m) for m in missing)} named in the config are not in "
                            "the file.")
        check_unique_ids(frame, cfg.id_column, path)
        return frame

    def on_after_batch_transfer(self, batch, dataloader_idx):
        """Images stay uint8 on the device (4× less memory); each batch is scaled to the model's range here."""
        if isinstance(batch, list):  # fused steps: a list of batches
            return [self.on_after_batch_transfer(b, dataloader_idx) for b in batch]
        images, cat, num = batch
        return to_model_range(images, self.cfg.value_range), cat, num

    def _fingerprint_rows(self) -> np.ndarray:
        conditions = pd.util.hash_pandas_object(self.frame[[c.name for c in self.cfg.conditions]], index=False)
        pixels = self.images.flatten(1).numpy()
        per_image = np.frombuffer(b"".join(hashlib.sha1(row.tobytes()).digest()[:8] for row in pixels),
                                  dtype=np.uint64)
        return np.stack([conditions.to_numpy(), per_image], axis=1)

"""Evaluation of image models: per-sparsity pixel error, diversity, and real-vs-generated sample grids."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch

from modules.config import EvaluationConfig
from modules.evaluation import (ADHERENCE_COUNTS_HEADING, ERROR_TABLES, _chunked_mean, _Progress, diversity,
                                error_per_sparsity, evaluation_inputs, level_masks, mask_draws, printed_tables,
                                publish, sample_based_per_sparsity, save_tables)
from modules.image_data import from_model_range, to_model_range
from modules.progress import shows_progress


@dataclass
class SampleGridConfig:
    """Sample grids written during training (image models)."""
    every_n_epochs: int = 5  # 0 = never; grids go to <run>/samples/ and W&B
    n_real: int = 8  # validation images shown next to their reconstructions from conditions only
    per_prompt: int = 8
    prompts: list[dict[str, Any]] = field(default_factory=lambda: [{}])  # partial conditions; {} = unconditional


def check_sample_grid(cfg, source: str) -> None:
    """`sample_grid` ranges, and prompts that name only configured conditions."""
    from modules.training import require

    require(cfg.sample_grid.every_n_epochs >= 0, source, "sample_grid.every_n_epochs", "≥ 0 (0 = never)",
            cfg.sample_grid.every_n_epochs)
    names = {c.name for c in cfg.data.conditions}
    for prompt in cfg.sample_grid.prompts:
        unknown = sorted(set(prompt) - names)
        require(not unknown, source, "sample_grid.prompts", f"conditions of data.conditions ({', '.join(sorted(names))})",
                prompt)


LABEL_HEIGHT = 14  # pixels of the text band above a labelled row


def prompt_label(prompt: dict) -> str:
    """The row label of a partial prompt: its conditions, or "unconditional" when every condition is masked."""
    if not prompt:
        return "unconditional (every condition masked)"
    return ", ".join(f"{name}={value}" for name, value in prompt.items())


def _label_band(text: str, width: int, channels: int) -> np.ndarray:
    """A white band with `text` in black (PIL's built-in font, which has ASCII glyphs only: other characters are
    spelled out or replaced), cut with "..." when wider than the grid."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    band = Image.new("L", (width, LABEL_HEIGHT), 255)
    draw = ImageDraw.Draw(band)
    text = text.replace("–", "-").replace("—", "-").replace("…", "...").replace("×", "x")
    text = text.encode("ascii", "replace").decode()
    shown = text
    while shown and draw.textlength(shown, font=font) > width - 4:
        shown = shown[:-4] + "..." if len(shown) > 4 else ""
    draw.text((2, 1), shown, fill=0, font=font)
    array = np.asarray(band)[..., None]
    return np.repeat(array, channels, axis=2)


def image_grid(rows: list[torch.Tensor], path: Path, *, labels: Optional[list[Optional[str]]] = None) -> Path:
    """uint8 image batches (each (N, C, H, W)) as the rows of one PNG, separated by 2-pixel gaps; with `labels`,
    each row gets its label (None: no band) in a text band above it."""
    from PIL import Image

    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"image_grid: {len(labels)} labels for {len(rows)} rows")
    tiles = []
    for batch in rows:
        images = batch.cpu().numpy().transpose(0, 2, 3, 1)  # N, H, W, C
        gap = np.full((images.shape[1], 2, images.shape[3]), 255, np.uint8)
        tiles.append(np.concatenate([x for image in images for x in (image, gap)][:-1], axis=1))
    width = max(t.shape[1] for t in tiles)
    channels = tiles[0].shape[2]
    tiles = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    if labels is not None:
        tiles = [np.concatenate([_label_band(label, width, channels), t], axis=0) if label else t
                 for label, t in zip(labels, tiles)]
    hgap = np.full((2, width, channels), 255, np.uint8)
    grid = np.concatenate([x for t in tiles for x in (t, hgap)][:-1], axis=0)
    grid = grid[..., 0] if grid.shape[2] == 1 else grid
    Image.fromarray(grid).save(path)
    return Path(path)


@shows_progress
@torch.no_grad()
def evaluate_images(model, dm, out_dir: Path, *, split: str = "test", cfg: Optional[EvaluationConfig] = None,
                    wandb_run=None, quiet: bool = False) -> dict:
    """Write eval/{mse_per_sparsity,diversity,adherence,…}.csv, mse_per_sparsity.png, adherence.png, samples.png
    and summary.json. Unless `quiet`, every stage prints a line and the long ones (the samples, the adherence CNN,
    the mcLDM's denoising steps) draw a progress bar on a terminal's stderr."""

    limit = (cfg or model.cfg.evaluation).max_images
    cfg, out_dir, (raw, cat, num) = evaluation_inputs(
        model, dm, out_dir, split, cfg, tensors=tuple(t[:limit] for t in dm.split_images(split)))
    images = to_model_range(raw, dm.cfg.value_range)
    target = model.evaluation_target(images)  # the images, or for a latent model the decoded ground truth
    progress = _Progress(quiet)
    progress("single-z errors")
    error_table = ERROR_TABLES["mse"]
    tables = {error_table: error_per_sparsity(
        model, target, cat, num, cfg, name="mse",
        error=lambda generated: (generated - target).pow(2).mean().item())}
    tr_raw, tr_cat, tr_num = dm.split_images("train")
    to_range = lambda x: to_model_range(x, dm.cfg.value_range)  # noqa: E731
    if cfg.samples_per_design:  # the energy score, mean-of-k and best-of-k with the training-image baselines
        progress(f"{cfg.samples_per_design} samples per image")
        sampled = sample_based_per_sparsity(model, target, cat, num, cfg, train=tr_raw, name="mse", per_feature=True,
                                            to_space=to_range)
        tables[error_table] = tables[error_table].merge(sampled, on="sparsity", sort=False)
    elif cfg.baselines:  # the mean training image alone
        tables[error_table]["train_mean_mse"] = float(
            (_chunked_mean(tr_raw, to_range).to(model.device)[None] - target).pow(2).mean())
    progress("diversity")
    tables["diversity"] = diversity(model, images, cat, num, cfg)
    if cfg.adherence:
        from modules.image_adherence import (asked_for_adherence, fit_condition_classifier, generate_in_chunks,
                                             image_adherence, nearest_image_adherence)

        progress("adherence classifier on the real training images")
        tr_raw, tr_cat, tr_num = (t.to(model.device) for t in (tr_raw, tr_cat, tr_num))
        train_images = to_model_range(tr_raw, dm.cfg.value_range)
        classifier = fit_condition_classifier(train_images, tr_cat, tr_num, model.schema, seed=cfg.mask_seed)
        from modules.fid import make_fid

        fid = make_fid(cfg.fid, cfg.inception_weights, classifier, raw, dm.cfg.value_range)
        fids, unmasked = [], {}

        def record(level, generated):
            if level == 0:
                unmasked["images"] = generated  # every condition given: the nearest-image check below
            if fid is not None:
                fids.append({"sparsity": level, "fid": fid(from_model_range(generated, dm.cfg.value_range)),
                             "features": fid.name})

        progress("adherence of generated images" + (" and Fréchet distance" if fid is not None else ""))
        tables["adherence"] = image_adherence(model, classifier, images, cat, num, cfg, train_cat=tr_cat,
                                              train_num=tr_num, on_generated=record)
        if fids:
            tables["fid"] = pd.DataFrame(fids)
        progress("adherence by the nearest real training image")
        if "images" not in unmasked:  # sparsity 0 was not among the levels
            none = torch.zeros_like(cat, dtype=torch.bool)
            given = model.masking.apply(cat, num, none, torch.zeros_like(num, dtype=torch.bool))
            g = torch.Generator(device=model.device).manual_seed(cfg.paper_z_seed + 3000)
            unmasked["images"] = generate_in_chunks(model, given, g)
        tables["adherence_nearest"] = nearest_image_adherence(unmasked["images"], images, cat, num, train_images,
                                                              tr_cat, tr_num, model.schema)
        if cfg.asked_for_rows:
            progress(f"asked-for adherence ({cfg.asked_for_rows} test rows per category)")
            tables["adherence_asked"] = asked_for_adherence(model, classifier, images, cat, num, train_cat=tr_cat,
                                                            rows=cfg.asked_for_rows, seed=cfg.sample_seed + 7000)
    progress.done()
    figures = save_tables(tables, out_dir, error_name="mse")
    # real test images, then generated from their conditions at sparsity 0, 0.5 and 0.9 (paper z)
    shown = min(8, len(images))
    uniform = mask_draws(cat, num, cfg)[:shown]
    z = torch.randn((1, *model.latent_shape), generator=torch.Generator(device=model.device).manual_seed(
        cfg.paper_z_seed), device=model.device).expand(shown, *model.latent_shape)
    rows, labels = [raw[:shown]], [f"real {split} images"]
    for level in (0.0, 0.5, 0.9):
        generated = model.generate(level_masks(model, cat[:shown], num[:shown], level, uniform), z=z)
        rows.append(from_model_range(generated, dm.cfg.value_range))
        labels.append(f"generated from their conditions, sparsity {level} (one shared x_T / z)")
    figures["samples"] = image_grid(rows, out_dir / "samples.png", labels=labels)
    mse = tables[error_table].set_index("sparsity")
    summary = {"split": split, "n_images": int(len(images)), "samples_per_image": cfg.samples_per_design,
               **{column: {str(k): float(v) for k, v in mse[column].items()} for column in mse.columns
                  if column != "train_mean_mse"},
               **({"train_mean_mse": float(mse["train_mean_mse"].iloc[0])} if "train_mean_mse" in mse else {}),
               "diversity": tables["diversity"].to_dict(orient="records"),
               "samples": "samples.png: real test images, then generated at sparsity 0.0, 0.5, 0.9"}
    if "adherence" in tables:
        summary["adherence"] = tables["adherence"].to_dict(orient="records")
    for name in ("fid", "adherence_nearest", "adherence_asked"):
        if name in tables:
            summary[name] = tables[name].to_dict(orient="records")
    k = cfg.samples_per_design
    printed = printed_tables(tables, "mse")
    publish(out_dir, tables, figures, summary, wandb_run=wandb_run, quiet=quiet, printed=printed, headings={
        error_table: f"Pixel MSE (value range {dm.cfg.value_range}) per evaluation sparsity on the {split} "
                            f"split, {len(images)} images. single_z: the paper's protocol (one z / x_T for every "
                            "image); prior: a z per image" + (
                                f"; ES: energy score from {k} samples per image (lower is better, proper); "
                                f"mean_of_k / best_of_k: pixel MSE of the mean / the closest of the {k} samples:"
                                if k else ":"),
        "baselines": "Baselines: pixel MSE of the mean training image (train_mean); ES of the mean training image and "
                     f"of {k} random training images (train_sample), on the same masks:" if k else
                     "Baselines: pixel MSE of the mean training image (train_mean):",
        "adherence": "Condition adherence (accuracy / R² of a CNN trained on real training images; majority: without "
                     "looking at the image; informative: real images clear it; n: real images scored):",
        "adherence_n": ADHERENCE_COUNTS_HEADING.format(what="Generated images"),
        "adherence_nearest": "Adherence by the nearest real training image (pixel distance; no network to fool): "
                             "its conditions against the asked ones, for the real test images and for images "
                             "generated from their conditions, none masked:",
        "adherence_asked": f"Asked-for adherence: the first {cfg.asked_for_rows} test rows with one condition set to "
                           "each category (the rest kept), one sample each; generated: the share the classifier "
                           "reads as the asked category; real: its recall on the real test images of the category:",
        "diversity": "Diversity (mean pairwise distance of images):",
        "fid": "Fréchet distance of generated to real test images per sparsity (features named):"},
        footer=" (samples.png: real, then generated at sparsity 0.0 / 0.5 / 0.9)")
    return tables


class SampleGridCallback(pl.Callback):
    """Every N epochs (and after the last): validation images next to images generated from their conditions
    (one fixed z), and a row per fixed partial prompt; written to <run>/samples/epoch_<NNN>.png and logged to W&B."""

    def __init__(self, run_dir: Path, cfg):
        self.run_dir, self.cfg = Path(run_dir), cfg

    def on_validation_epoch_end(self, trainer, pl_module):
        epoch, every = trainer.current_epoch + 1, self.cfg.every_n_epochs
        if not every or (epoch % every and epoch < trainer.max_epochs):
            return
        path = write_sample_grid(pl_module, trainer.datamodule, self.cfg,
                                 self.run_dir / "samples" / f"epoch_{trainer.current_epoch:03d}.png")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                try:
                    import wandb

                    logger.experiment.log({"samples": wandb.Image(str(path)), "trainer/global_step": trainer.global_step})
                except Exception as err:  # W&B never breaks training
                    print(f"W&B: could not log the sample grid ({err})")


@torch.no_grad()
def write_sample_grid(model, dm, cfg, path: Path) -> Path:
    """Labelled rows: real validation images, generated from their full conditions, then one row per prompt with
    `per_prompt` samples (seeded: the same noise every epoch)."""
    was_training = model.training
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = "val" if len(dm.tensors["val"][0]) else "train"
    raw, cat, num = (t[: cfg.n_real].to(model.device) for t in dm.split_images(part))
    g = torch.Generator(device=model.device).manual_seed(0)  # the same z every epoch: the grids compare
    z = torch.randn((1, *model.latent_shape), generator=g, device=model.device).expand(len(raw), *model.latent_shape)
    nothing = torch.zeros_like(cat, dtype=torch.bool)
    generated = model.generate(model.masking.apply(cat, num, nothing, torch.zeros_like(num, dtype=torch.bool)), z=z)
    rows = [raw, from_model_range(generated, dm.cfg.value_range)]
    labels = [f"real {'validation' if part == 'val' else 'training'} images",
              "generated from the conditions of the real images above (one shared x_T / z)"]
    for prompt in cfg.prompts:  # seed 0 for every prompt and epoch: grids of two epochs compare
        rows.append(model.sample(prompt, n=cfg.per_prompt, seed=0))
        labels.append(f"{prompt_label(prompt)}  ({cfg.per_prompt} samples)")
    image_grid(rows, path, labels=labels)
    model.train(was_training)
    return path

"""Plots: training curves, evaluation tables, and drawings of parametric designs (bikes, profiles, point sets)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


# --------------------------------------------------------------------------- training and evaluation


def plot_training_curves(metrics_csv: Path, out_dir: Path) -> list[Path]:
    """loss.png (train/val loss and its parts per epoch) and sparsity.png from a Lightning metrics.csv."""
    metrics = pd.read_csv(metrics_csv)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    per_epoch = metrics.groupby("epoch").mean(numeric_only=True) if "epoch" in metrics else metrics
    losses = [c for c in per_epoch.columns if c.startswith(("train/", "val/"))]
    if losses:
        found = {c.split("/", 1)[1] for c in losses}
        parts = [p for p in ("loss", "reconstruction", "kl") if p in found] + sorted(found - {"loss", "reconstruction", "kl"})
        fig, axes = plt.subplots(1, len(parts), figsize=(4.2 * len(parts), 3.4), squeeze=False)
        for ax, part in zip(axes[0], parts):
            for split in ("train", "val"):
                column = f"{split}/{part}"
                if column in per_epoch:
                    series = per_epoch[column].dropna()
                    ax.plot(series.index, series.values, label=split)
            ax.set_title(part)
            ax.set_xlabel("epoch")
            if (per_epoch[[c for c in losses if c.endswith("/" + part)]].min() > 0).all():
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = out_dir / "loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if "sparsity" in per_epoch:
        series = per_epoch["sparsity"].dropna()
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(series.index, series.values, drawstyle="steps-post")
        ax.set_xlabel("epoch")
        ax.set_ylabel("sparsity p")
        ax.set_title("training sparsity")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / "sparsity.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (110 dpi) and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


BASELINE_STYLE = {"train_mean": ("mean training example", "C7", (0, (4, 2))),
                  "conditional_forest": ("forest on the masked conditions", "C3", (0, (1, 1.5))),
                  "train_sample": ("random training examples", "C5", (0, (3, 1, 1, 1)))}


def plot_error_per_sparsity(table: pd.DataFrame, name: str, path: Path) -> Path:
    """Left: the squared errors against the sparsity (`<name>_paper`, `<name>_prior` ± sd, mean-of-k, best-of-k and
    the baselines' `<baseline>_<name>`); right, when the table has it: the energy score of the model and the
    baselines. Baselines are dashed."""
    levels = table[table["sparsity"] != "mean"]
    x = levels["sparsity"].astype(float)
    has_es = "energy_score" in levels
    fig, axes = plt.subplots(1, 2 if has_es else 1, figsize=(11 if has_es else 5.5, 3.8), squeeze=False)
    ax = axes[0][0]
    ax.plot(x, levels[f"{name}_paper"], "o-", color="C0", label="one shared z (paper protocol)")
    ax.errorbar(x, levels[f"{name}_prior"], yerr=levels[f"{name}_prior_std"], fmt="s--", color="C1", capsize=3,
                label="a z per design")
    for column, label, marker, color in ((f"{name}_mean_of_k", "mean of k samples", "^-", "C2"),
                                         (f"{name}_best_of_k", "best of k samples", "v-", "C4")):
        if column in levels:
            ax.plot(x, levels[column], marker, color=color, label=label)
    for baseline, (label, color, style) in BASELINE_STYLE.items():
        if f"{baseline}_{name}" in levels:
            ax.plot(x, levels[f"{baseline}_{name}"], color=color, ls=style, lw=1.6, label=f"baseline: {label}")
    ax.set_xlabel("evaluation sparsity (fraction of conditions masked)")
    ax.set_ylabel({"sse": "per-design SSE (normalised)", "mse": "pixel MSE"}.get(name, name))
    ax.set_title("squared error (favours the conditional mean)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if has_es:
        ax = axes[0][1]
        ax.plot(x, levels["energy_score"], "o-", color="C0", label="model (k samples per design)")
        for baseline, (label, color, style) in BASELINE_STYLE.items():
            if f"{baseline}_energy_score" in levels:
                ax.plot(x, levels[f"{baseline}_energy_score"], color=color, ls=style, lw=1.6,
                        label=f"baseline: {label}")
        ax.set_xlabel("evaluation sparsity (fraction of conditions masked)")
        ax.set_ylabel("energy score (lower is better)")
        ax.set_title("energy score (proper: lowest for the true distribution)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_adherence(table: pd.DataFrame, path: Path) -> Path:
    """Adherence against the sparsity, accuracy and R² on panels of their own; dotted: real designs; sparse
    dots: the majority baseline. Conditions that are not informative (real ≈ majority) are drawn faint."""
    level_columns = [c for c in table.columns if re.fullmatch(r"[0-9.]+", str(c))]
    x = [float(c) for c in level_columns]
    metrics = [m for m in ("accuracy", "r2") if (table["metric"] == m).any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, row in table[table["metric"] == metric].iterrows():
            color = f"C{i % 10}"
            faint = "informative" in row and not bool(row["informative"])
            label = f"{row['condition']}" + (" (not informative)" if faint else "")
            ax.plot(x, row[level_columns].astype(float), "o-", color=color, label=label, alpha=0.35 if faint else 1)
            ax.axhline(row["real"], color=color, ls=":", lw=1, alpha=0.35 if faint else 1)
            if "majority" in row and np.isfinite(float(row["majority"])):
                ax.axhline(float(row["majority"]), color=color, ls=(0, (1, 4)), lw=0.8)
        ax.set_xlabel("evaluation sparsity")
        ax.set_ylabel(f"{'accuracy' if metric == 'accuracy' else 'R²'} on generated designs")
        ax.set_title("dotted: real designs; sparse dots: majority class / training mean", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- designs

def point_pairs(columns: Sequence[str]) -> list[tuple[str, str, str]]:
    """(label, x column, y column) for columns named x_NAME/y_NAME, NAME_x/NAME_y, xNAME/yNAME or NAMEx/NAMEy,
    in column order."""
    pairs, used = [], set()
    cols = set(columns)
    for c in columns:
        if c in used:
            continue
        for label, partner in ((c[2:], "y_" + c[2:]) if c.startswith("x_") else (None, None),
                               (c[:-2], c[:-2] + "_y") if c.endswith("_x") else (None, None),
                               (c[1:], "y" + c[1:]) if c.startswith("x") else (None, None),
                               (c[:-1], c[:-1] + "y") if c.endswith("x") else (None, None)):
            if partner in cols and partner not in used:
                pairs.append((label.strip("_") or c, c, partner))
                used.update((c, partner))
                break
    return pairs


def draw_points(ax, row: pd.Series, *, outline_points: Optional[int] = None, color="k") -> None:
    pairs = point_pairs(row.index)
    xy = np.array([[row[x], row[y]] for _, x, y in pairs], dtype=float)
    if outline_points:
        outline = np.vstack([xy[:outline_points], xy[:1]])
        ax.plot(outline[:, 0], outline[:, 1], color=color, lw=1.5)
        ax.plot(xy[outline_points:, 0], xy[outline_points:, 1], "o", color=color, ms=3)
    else:
        ax.plot(xy[:, 0], xy[:, 1], "o", color=color, ms=3)


def _bike_sketches(designs: pd.DataFrame, size: int = 256) -> list[np.ndarray]:
    """Rendered sketches of the rows, cropped to the band all of them use (the render window is square)."""
    from modules.render import render_bike

    images = [render_bike(row, row.to_dict(), size=size) for _, row in designs.iterrows()]
    used = np.flatnonzero((np.stack(images) < 250).any(axis=(0, 2)))
    top, bottom = (max(used[0] - 4, 0), min(used[-1] + 5, size)) if used.size else (0, size)
    return [image[top:bottom] for image in images]


def design_grid(designs: pd.DataFrame, path: Path, *, style: str, outline_points: Optional[int] = None,
                titles: Optional[Sequence[str]] = None, columns: int = 4, suptitle: Optional[str] = None) -> Path:
    """Draw each design of `designs` in a grid of panels on one shared scale and write the image.

    `bike`: BIKED sketches from `modules.render` (condition columns in `designs`, such as the rim styles, are drawn
    too); `profile`/`points`: the (x, y) points, as a closed outline of the first `outline_points` or as dots.
    """
    from modules.errors import UserError

    pairs = point_pairs(designs.columns)
    if not pairs:
        raise UserError("--plot draws (x, y) points, and no design columns pair up: name them x_NAME/y_NAME, "
                        "NAME_x/NAME_y or xNAME/yNAME (or set data.plot_style: none).")
    n = len(designs)
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, (1.9 if style == "bike" else 2.4) * rows),
                             squeeze=False)
    xs = designs[[x for _, x, _ in pairs]].to_numpy(dtype=float)
    ys = designs[[y for _, _, y in pairs]].to_numpy(dtype=float)
    xlim = (np.nanmin(xs), np.nanmax(xs))
    ylim = (np.nanmin(ys), np.nanmax(ys))
    sketches = _bike_sketches(designs) if style == "bike" else None
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        row = designs.iloc[k]
        if sketches is not None:
            ax.imshow(sketches[k], cmap="gray", vmin=0, vmax=255)
            continue
        draw_points(ax, row, outline_points=outline_points if style == "profile" else None)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_aspect("equal")
        if titles is not None:
            ax.set_title(titles[k], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

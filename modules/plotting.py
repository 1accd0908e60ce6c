"""Plots: training curves, evaluation tables, and drawings of parametric designs (bikes, profiles, point sets)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


# --------------------------------------------------------------------------- training and evaluation

FEW_POINTS = 20  # a series with fewer points gets markers: a single point has no line to show


def _markers(n: int, marker: str = "o") -> dict:
    """Line-plot keywords that mark the points of a short series (`n` points)."""
    return {"marker": marker, "markersize": 4} if n < FEW_POINTS else {}


def training_figures(metrics: pd.DataFrame) -> dict[str, plt.Figure]:
    """From a Lightning metrics table: `loss` (train/val loss and its parts per epoch, a panel each) and `sparsity`
    (the training sparsity per epoch), where the table has them."""
    figures = {}
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
                    ax.plot(series.index, series.values, label=split, **_markers(len(series)))
            ax.set_title(part)
            ax.set_xlabel("epoch")
            if (per_epoch[[c for c in losses if c.endswith("/" + part)]].min() > 0).all():
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
        figures["loss"] = fig
    if "sparsity" in per_epoch:
        series = per_epoch["sparsity"].dropna()
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(series.index, series.values, drawstyle="steps-post", **_markers(len(series)))
        ax.set_xlabel("epoch")
        ax.set_ylabel("sparsity p")
        ax.set_title("training sparsity")
        ax.grid(alpha=0.3)
        figures["sparsity"] = fig
    return figures


def plot_training_curves(metrics_csv: Path, out_dir: Path) -> list[Path]:
    """loss.png and sparsity.png (`training_figures`) from a Lightning metrics.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = training_figures(pd.read_csv(metrics_csv))
    return [save_figure(fig, out_dir / f"{name}.png") for name, fig in figures.items()]


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (110 dpi) and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


BASELINE_STYLE = {"train_mean": ("mean training example", "C7", (0, (4, 2))),
                  "conditional_forest": ("forest on the masked conditions", "C3", (0, (1, 1.5))),
                  "train_sample": ("random training examples", "C5", (0, (3, 1, 1, 1)))}


def error_figure(table: pd.DataFrame, name: str) -> plt.Figure:
    """Left: the squared errors against the sparsity (`<name>_paper`, `<name>_prior` ± sd, mean-of-k, best-of-k and
    the baselines' `<baseline>_<name>`); right, when the table has it: the energy score of the model and the
    baselines. Baselines are dashed."""
    levels = table[table["sparsity"] != "mean"]
    x = levels["sparsity"].astype(float)
    baseline_markers = _markers(len(x), ".")
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
            ax.plot(x, levels[f"{baseline}_{name}"], color=color, ls=style, lw=1.6, label=f"baseline: {label}",
                    **baseline_markers)
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
                        label=f"baseline: {label}", **baseline_markers)
        ax.set_xlabel("evaluation sparsity (fraction of conditions masked)")
        ax.set_ylabel("energy score (lower is better)")
        ax.set_title("energy score (proper: lowest for the true distribution)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def plot_error_per_sparsity(table: pd.DataFrame, name: str, path: Path) -> Path:
    """`error_figure`, written to `path`."""
    return save_figure(error_figure(table, name), path)


FEW_SCORED = 20  # adherence at a level resting on fewer scored designs is drawn hollow: it is a noisy figure


def adherence_figure(table: pd.DataFrame) -> plt.Figure:
    """Adherence against the sparsity on one panel per metric (accuracy for categorical conditions, R² for
    numerical ones: their scales differ); dotted: real designs; sparse dots: the majority baseline. Conditions
    that are not informative (real ≈ majority) are drawn faint; a level scored on fewer than FEW_SCORED designs
    (its `n_<level>`) has a hollow marker."""
    level_columns = [c for c in table.columns if re.fullmatch(r"[0-9.]+", str(c))]
    x = np.array([float(c) for c in level_columns])
    metrics = [m for m in ("accuracy", "r2") if (table["metric"] == m).any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, row in table[table["metric"] == metric].iterrows():
            color = f"C{i % 10}"
            faint = "informative" in row and not bool(row["informative"])
            alpha = 0.35 if faint else 1
            label = f"{row['condition']}" + (" (not informative)" if faint else "")
            y = row[level_columns].to_numpy(dtype=float)
            ax.plot(x, y, "o-", color=color, ms=5, label=label, alpha=alpha)
            counts = np.array([float(row.get(f"n_{c}", np.inf)) for c in level_columns])
            few = counts < FEW_SCORED  # drawn over the filled marker, hollow
            ax.plot(x[few], y[few], "o", ms=5, color=color, markerfacecolor="white", alpha=alpha)
            ax.axhline(row["real"], color=color, ls=":", lw=1, alpha=alpha)
            if "majority" in row and np.isfinite(float(row["majority"])):
                ax.axhline(float(row["majority"]), color=color, ls=(0, (1, 4)), lw=0.8)
        ax.set_xlabel("evaluation sparsity")
        ax.set_ylabel("accuracy (categorical conditions)" if metric == "accuracy" else "R² (numerical conditions)")
        ax.set_title(f"{'accuracy' if metric == 'accuracy' else 'R²'} of the condition predictor on generated "
                     f"samples\ndotted: real; sparse dots: majority class / training mean; hollow: < {FEW_SCORED} "
                     "scored", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    return fig


def plot_adherence(table: pd.DataFrame, path: Path) -> Path:
    """`adherence_figure`, written to `path`."""
    return save_figure(adherence_figure(table), path)


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


PLOT_STYLES = ("auto", "bike", "profile", "points", "columns", "none")  # data.plot_style (modules.config)


def resolve_plot_style(style: str, design_columns: Sequence[str]) -> str:
    """The drawing of designs with these columns, decided before anything is generated: `bike`, `profile`,
    `points` or `columns`.

    `auto` is `bike` for BIKED's columns (all that `modules.render` draws), `points` when every design column pairs
    up as (x, y) (x_NAME/y_NAME, NAME_x/NAME_y, xNAME/yNAME), else `columns` (generated against real designs, a
    strip per column); `none` (no drawing of the shapes) is `columns`. An explicit style that cannot draw the
    columns raises a `UserError` naming them and `data.plot_style`.
    """
    from modules.errors import UserError
    from modules.render import DESIGN_COLUMNS as BIKE_COLUMNS

    columns = list(design_columns)
    if style not in PLOT_STYLES:
        raise UserError(f"data.plot_style: {style!r} is not a plot style; choose one of {', '.join(PLOT_STYLES)}.")
    if not columns:
        raise UserError("data.plot_style: there are no design columns to draw (data.design_columns is empty).")
    missing_bike = [c for c in BIKE_COLUMNS if c not in columns]
    paired = {c for _, x, y in point_pairs(columns) for c in (x, y)}
    if style == "auto":
        return "bike" if not missing_bike else "points" if len(paired) == len(columns) else "columns"
    if style == "none":
        return "columns"
    if style == "bike" and missing_bike:
        raise UserError(f"data.plot_style: bike draws BIKED designs, and the design columns lack "
                        f"{_listing(missing_bike)}. Set data.plot_style: auto (or columns) for these columns.")
    if style in ("points", "profile") and not paired:
        raise UserError(f"data.plot_style: {style} draws (x, y) points, and no design columns pair up "
                        f"({_listing(columns)}): name them x_NAME/y_NAME, NAME_x/NAME_y or xNAME/yNAME, or set "
                        "data.plot_style: auto (or columns) to draw each column against the real designs.")
    return style


def _listing(names: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def real_designs_like(real: pd.DataFrame, conditions: Mapping[str, Any], schema) -> pd.DataFrame:
    """The rows of `real` that share `conditions` ({name: value}, as for `sample`): the same category, and
    numerical values within a tenth of the condition's training range (`schema`, a `ConditionSchema`) of the
    asked one. Conditions not given are free (none given: every row); a row missing a given condition is left
    out."""
    from modules.conditioning import canonical_category
    from modules.errors import UserError

    keep = np.ones(len(real), dtype=bool)
    for name, value in conditions.items():
        asked = schema.parse_value(name, value)
        if asked is None:  # an empty category: masked
            continue
        if name not in real:
            raise UserError(f"the real designs have no column '{name}'; they must come from the model's data file.")
        condition = schema[name]
        if condition.kind == "categorical":
            keep &= real[name].map(canonical_category).to_numpy(dtype=object) == asked
        else:
            values = pd.to_numeric(real[name], errors="coerce").to_numpy(dtype=float)
            tolerance = 0.1 * ((condition.maximum - condition.minimum) or 1.0)
            keep &= np.abs(values - asked) <= tolerance  # NaN (missing) compares False
    return real[keep]


def _unit_scale(reference: pd.DataFrame, columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(low, span) per column: the min–max of `reference`; a constant or empty column is centred at 0.5."""
    import warnings

    values = reference[list(columns)].to_numpy(dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing column gives NaN, handled below
        low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    span = high - low
    flat = ~(span > 0)  # zero or NaN
    return np.where(flat, np.nan_to_num(low) - 0.5, low), np.where(flat, 1.0, span)


COLUMNS_PER_ROW = 12  # design columns per row of panels in the `columns` picture


def columns_figure(generated: pd.DataFrame, *, design_columns: Optional[Sequence[str]] = None,
                   real: Optional[pd.DataFrame] = None, conditions: Optional[str] = None,
                   per_row: int = COLUMNS_PER_ROW) -> plt.Figure:
    """Generated designs against real designs, per design column, for data with no drawing of its own.

    Every column on the 0–1 scale of the real designs' min–max (of the generated ones when no real designs are
    given): real designs as a grey violin (dots when fewer than 5), generated ones as dots beside it; columns wrap
    into rows of `per_row` panels. `design_columns` default to the numerical columns of `generated`; `conditions`
    (text) names what was asked, in the title.
    """
    columns = list(design_columns) if design_columns is not None else list(
        generated.select_dtypes("number").columns)
    has_real = real is not None and len(real) > 0
    low, span = _unit_scale(real if has_real else generated, columns)
    scaled = lambda frame: (frame[columns].to_numpy(dtype=float) - low) / span  # noqa: E731
    gen, ref = scaled(generated), (scaled(real) if has_real else None)
    rows = max(1, math.ceil(len(columns) / per_row))
    slots = min(per_row, len(columns))
    fig, axes = plt.subplots(rows, 1, figsize=(max(6.0, 0.6 * slots + 1.6), 3.3 * rows + 0.5), squeeze=False)
    jitter = np.random.default_rng(0).uniform(-0.07, 0.07, size=len(gen))  # fixed: the same picture every time
    offset = 0.18 if has_real else 0.0
    violins = False
    for r, ax in enumerate(axes[:, 0]):
        part = range(r * per_row, min((r + 1) * per_row, len(columns)))
        for slot, j in enumerate(part):
            if has_real:
                values = ref[:, j][np.isfinite(ref[:, j])]
                if len(values) >= 5 and np.ptp(values) > 0:
                    body = ax.violinplot([values], positions=[slot - offset], widths=0.32, showextrema=False)
                    violins = True
                    for patch in body["bodies"]:
                        patch.set_facecolor("0.6")
                        patch.set_edgecolor("0.4")
                        patch.set_alpha(0.55)
                    ax.plot([slot - offset - 0.1, slot - offset + 0.1], [np.median(values)] * 2, color="0.25", lw=1.2)
                else:
                    ax.plot(np.full(len(values), slot - offset), values, "o", color="0.45", ms=3, alpha=0.7)
            ax.plot(slot + offset + jitter, gen[:, j], "o", color="C0", ms=3.5, alpha=0.8)
        ax.set_xticks(range(len(part)))
        ax.set_xticklabels([columns[j] for j in part], rotation=45, ha="right", fontsize=7)
        ax.set_xlim(-0.6, slots - 0.4)
        ax.axhspan(0, 1, color="0.92", zorder=0)
        ax.set_ylabel("normalised value", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles = [Line2D([], [], ls="", marker="o", color="C0", label=f"generated ({len(generated)})")]
    if has_real:
        handles.append(Line2D([], [], ls="", marker="s" if violins else "o", ms=8 if violins else 4, color="0.6",
                              label=f"real designs sharing the conditions ({len(real)})"))
    axes[0, 0].legend(handles=handles, fontsize=7, loc="lower left", bbox_to_anchor=(0, 1), ncol=2, frameon=False)
    scale = "real designs'" if has_real else "generated designs' (no real designs given)"
    fig.suptitle(f"{conditions or 'designs'}\nper design column; 0–1 (shaded): the {scale} min–max", fontsize=9)
    return fig


def design_figure(designs: pd.DataFrame, *, style: str, design_columns: Optional[Sequence[str]] = None,
                  outline_points: Optional[int] = None, titles: Optional[Sequence[str]] = None, columns: int = 4,
                  suptitle: Optional[str] = None, real: Optional[pd.DataFrame] = None) -> plt.Figure:
    """The figure of `design_grid` (the same arguments but the path)."""
    style = resolve_plot_style(style, design_columns if design_columns is not None else designs.columns)
    if style == "columns":
        return columns_figure(designs, design_columns=design_columns, real=real, conditions=suptitle)
    design_columns = list(design_columns) if design_columns is not None else list(designs.columns)
    n = len(designs)
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, (1.9 if style == "bike" else 2.4) * rows),
                             squeeze=False)
    sketches = _bike_sketches(designs) if style == "bike" else None
    if sketches is None:
        pairs = point_pairs(design_columns)
        xs = designs[[x for _, x, _ in pairs]].to_numpy(dtype=float)
        ys = designs[[y for _, _, y in pairs]].to_numpy(dtype=float)
        xlim, ylim = (np.nanmin(xs), np.nanmax(xs)), (np.nanmin(ys), np.nanmax(ys))
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        if titles is not None:
            ax.set_title(titles[k], fontsize=7)
        if sketches is not None:
            ax.imshow(sketches[k], cmap="gray", vmin=0, vmax=255)
            continue
        draw_points(ax, designs.iloc[k][design_columns], outline_points=outline_points if style == "profile" else None)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_aspect("equal")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig


def design_grid(designs: pd.DataFrame, path: Path, *, style: str, design_columns: Optional[Sequence[str]] = None,
                outline_points: Optional[int] = None, titles: Optional[Sequence[str]] = None, columns: int = 4,
                suptitle: Optional[str] = None, real: Optional[pd.DataFrame] = None) -> Path:
    """Draw the designs and write the image; returns its path.

    `style` as `data.plot_style` (`resolve_plot_style`; `auto` is resolved here). `bike`: BIKED sketches from
    `modules.render` (condition columns in `designs`, such as the rim styles, are drawn too); `profile`/`points`:
    the (x, y) points in a grid of panels on one shared scale, as a closed outline of the first `outline_points` or
    as dots, a panel per design titled `titles[k]`; `columns`: every design column against the `real` designs
    (optional) on their 0–1 scale (`columns_figure`). `design_columns` (default: every column of `designs`) keeps
    the condition columns out of the points and the columns picture; `suptitle` names what was asked.
    """
    return save_figure(design_figure(designs, style=style, design_columns=design_columns,
                                     outline_points=outline_points, titles=titles, columns=columns,
                                     suptitle=suptitle, real=real), path)

"""The diversity trade-off of an mcVAE: one trained model per split seed, evaluated at several sampling
temperatures τ (z = μ_p(c) + τ·σ_p(c)·ε; τ = 0 is the prior's mean, a point predictor). Energy score, single-z SSE
and adherence against the diversity ratio, beside the baselines.

    python benchmarks/tradeoff_mcvae.py                        # configs/mcvae_biked.yaml, split seeds 0-4 (≈ 8 min)
    python benchmarks/tradeoff_mcvae.py --split_seeds 0 --temperatures 0 0.5 1

Writes benchmarks/results/tradeoff_<config>.{csv,png,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mcvae_biked", help="config name or path")
    p.add_argument("--split_seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.25])
    p.add_argument("--epochs", type=int, help="override trainer.max_epochs")
    p.add_argument("--csv_path", help="the data file (default: the config's)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def train(config: str, seed: int, args, out: Path) -> Path:
    """Train the config on split `seed` (no evaluation); returns the last checkpoint."""
    import contextlib
    import io

    from experiments.sweep import make_config
    from modules.registry import MCVAE_SPEC
    from modules.training import train_main

    overrides = {"data.split.seed": seed}
    if args.epochs:
        overrides["trainer.max_epochs"] = args.epochs
    if args.csv_path:
        overrides["data.csv_path"] = str(Path(args.csv_path).resolve())
    name = f"{Path(config).stem}_split{seed}"
    path = make_config(config, overrides, out / "configs" / f"{name}.yaml")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        train_main(["--config", str(path), "--logdir", str(out / "logs"), "--name", name, "--no_eval"], MCVAE_SPEC)
    run_dir = Path(re.findall(r"run directory: (.+)", printed.getvalue())[-1].strip())
    return run_dir / "checkpoints" / "last.ckpt"


def evaluate_at(ckpt: Path, temperatures: list[float], out: Path) -> list[dict]:
    """Rows of figures for every temperature (the model loaded once; the baselines do not depend on τ)."""
    from modules.evaluation import ERROR_TABLES, evaluate_parametric
    from modules.registry import MCVAE_SPEC

    dm, model = MCVAE_SPEC.load(ckpt)
    rows = []
    for i, tau in enumerate(temperatures):
        model.cfg.model.temperature = tau
        cfg = dataclasses.replace(model.cfg.evaluation, baselines=(i == 0))
        tables = evaluate_parametric(model, dm, out / f"{ckpt.parent.parent.name}_t{tau}", cfg=cfg, quiet=True)
        errors = tables[ERROR_TABLES["sse"]].set_index("sparsity")
        adherence = tables["adherence"]
        first = [c for c in adherence.columns if re.fullmatch(r"[0-9.]+", str(c))][0]
        informative = adherence[adherence["informative"]]
        row = {"temperature": tau, "diversity_ratio": float(tables["diversity"]["generated/real"].iloc[0]),
               "energy_score": float(errors.loc["mean", "energy_score"]),
               "sse_single_z": float(errors.loc["mean", "sse_paper"]),
               "sse_z_per_design": float(errors.loc["mean", "sse_prior"]),
               "sse_mean_of_k": float(errors.loc["mean", "sse_mean_of_k"]),
               "adherence_minus_real": float((informative[first] - informative["real"]).mean())}
        for _, r in informative.iterrows():
            row[f"adh−real {r['condition']}"] = float(r[first] - r["real"])
        if "all_checks" in tables["validity"]:
            row["valid"] = float(tables["validity"]["all_checks"].iloc[1])
        if i == 0:
            baselines = {c: float(errors.loc["mean", c]) for c in errors.columns
                         if c.startswith(("conditional_forest", "train_mean", "train_sample"))}
        rows.append({**row, **baselines})
    return rows


def plot(table: pd.DataFrame, path: Path) -> Path:
    from modules.plotting import save_figure  # first: it sets the Agg backend

    import matplotlib.pyplot as plt

    mean = table.groupby("temperature").mean(numeric_only=True)
    sd = table.groupby("temperature").std(numeric_only=True).fillna(0.0)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, column, label, baselines in (
            (axes[0], "energy_score", "energy score (mean over levels)",
             {"conditional_forest_energy_score": "forest", "train_mean_energy_score": "train mean",
              "train_sample_energy_score": "random training designs"}),
            (axes[1], "sse_single_z", "SSE: one z for all designs (the paper's protocol, ●) and a z per design (■)",
             {"conditional_forest_sse": "forest", "train_mean_sse": "train mean"}),
            (axes[2], "adherence_minus_real", "adherence at s = 0 − real (informative conditions)", {})):
        ax.errorbar(mean["diversity_ratio"], mean[column], xerr=sd["diversity_ratio"], yerr=sd[column], fmt="o-",
                    capsize=3, label="model" if column != "sse_single_z" else "model, one z for all")
        if column == "sse_single_z":
            ax.errorbar(mean["diversity_ratio"], mean["sse_z_per_design"], yerr=sd["sse_z_per_design"], fmt="s--",
                        capsize=3, label="model, a z per design")
        for tau, x, y in zip(mean.index, mean["diversity_ratio"], mean[column]):
            ax.annotate(f"τ={tau:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for i, (baseline, name) in enumerate(baselines.items()):
            if baseline in mean:
                ax.axhline(mean[baseline].iloc[0], color=f"C{i + 2}", ls="--", lw=1, label=f"baseline: {name}")
        if column == "adherence_minus_real":
            ax.axhline(0.0, color="k", lw=0.8, ls=":", label="real designs")
        ax.axvline(0.5, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("diversity ratio (generated / real spread, same conditions)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    import pytorch_lightning  # noqa: F401  (its import sets its logger to INFO)
    import torch

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)  # no model summary per split
    torch.set_num_threads(1)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.split_seeds:
        ckpt = train(args.config, seed, args, out / "tradeoff")
        for row in evaluate_at(ckpt, args.temperatures, out / "tradeoff" / "eval"):
            rows.append({"split_seed": seed, **row})
            print(f"split {seed}, τ = {row['temperature']:g}: diversity {row['diversity_ratio']:.3f}, ES "
                  f"{row['energy_score']:.4f}, single-z SSE {row['sse_single_z']:.4f}, adherence − real "
                  f"{row['adherence_minus_real']:+.3f}", flush=True)
    table = pd.DataFrame(rows)
    stem = f"tradeoff_{Path(args.config).stem}"
    table.to_csv(out / f"{stem}.csv", index=False)
    plot(table, out / f"{stem}.png")
    summary = table.groupby("temperature").agg(["mean", "std"]).drop(columns="split_seed")
    columns = ["diversity_ratio", "energy_score", "sse_single_z", "sse_z_per_design", "sse_mean_of_k",
               "adherence_minus_real", "valid"]
    lines = ["| τ | " + " | ".join(c for c in columns if c in table) + " |", "|---" * (1 + len(columns)) + "|"]
    for tau, r in summary.iterrows():
        cells = [f"{r[(c, 'mean')]:.4f} ± {r[(c, 'std')]:.4f}" if len(args.split_seeds) > 1 else f"{r[(c, 'mean')]:.4f}"
                 for c in columns if c in table]
        lines.append(f"| {tau:g} | " + " | ".join(cells) + " |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nwritten to {out}/{stem}.{{csv,png,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

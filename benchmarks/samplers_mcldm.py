"""Sampler quality against steps for a trained mcLDM: which sampler, how many steps.

    python benchmarks/samplers_mcldm.py --ckpt logs/<mcldm_biked_small run>/checkpoints/last.ckpt
    python benchmarks/samplers_mcldm.py --ckpt ... --runs ddim:50,dpm_solver:10,dpm_solver:15,dpm_solver:20

For each `sampler:steps` the same test images (`--images`, the evaluation's test split), generated from their own
conditions (sparsity 0) from the same x_T, with the checkpoint's guidance scale, are scored as evaluate.py scores
them:
- pixel MSE to the decoded ground truth D(E(x)) (the paper's error; the mean training image is the baseline);
- adherence: accuracy (R² for numbers) of the condition classifier trained on real training images, on each
  informative condition (the real images clear the majority class) and their mean;
- diversity: mean pairwise distance of images generated for the same conditions ÷ the real one;
- distance to the converged solution: pixel MSE to the images DDIM with `--reference_steps` (200) makes from the
  same x_T — how far a run is from the probability-flow ODE's answer, the error that steps cut (DDPM and DDIM with
  η > 0 are stochastic and have none);
- seconds per image (latents + decode) on this machine, and the ratio to the first run (same process).
Writes samplers.csv and samplers.png to --out (default benchmarks/results/samplers/).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_RUNS = "ddim:50,ddim:25,ddim:15,dpm_solver:10,dpm_solver:15,dpm_solver:20,unipc:10,unipc:15,euler:20"


def parse_runs(text: str) -> list[tuple[str, int]]:
    from modules.diffusion_components.diffusion import SAMPLERS

    runs = []
    for item in text.split(","):
        name, _, steps = item.strip().partition(":")
        if name not in SAMPLERS or not steps.isdigit():
            raise SystemExit(f"--runs: {item!r} is not sampler:steps with a sampler of {', '.join(SAMPLERS)}")
        runs.append((name, int(steps)))
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="an mcLDM checkpoint")
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"sampler:steps, comma-separated (default {DEFAULT_RUNS})")
    p.add_argument("--images", type=int, default=200, help="test images (default 200, as mcldm_biked_small's eval)")
    p.add_argument("--cfg_scale", type=float, help="guidance scale (default: the checkpoint's)")
    p.add_argument("--reference_steps", type=int, default=200, help="DDIM steps of the converged reference")
    p.add_argument("--out", default="benchmarks/results/samplers")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    runs = parse_runs(args.runs)

    import numpy as np
    import pandas as pd
    import torch

    from modules.evaluation import diversity, level_masks, mask_draws
    from modules.image_adherence import _predict, _scores, fit_condition_classifier, majority_per_condition
    from modules.image_data import to_model_range
    from modules.registry import spec_for
    from modules.sampling_cli import model_device
    from modules.training import quiet_lightning, read_checkpoint

    torch.set_num_threads(args.threads)
    quiet_lightning()
    checkpoint = read_checkpoint(Path(args.ckpt))
    dm, model = spec_for(checkpoint, args.ckpt).load(checkpoint, None)
    model.to(model_device(args.device)).eval()
    if args.cfg_scale is not None:
        model.set_sampling(cfg_scale=args.cfg_scale)
    cfg = model.cfg.evaluation
    raw, cat, num = (t[:args.images].to(model.device) for t in dm.split_images("test"))
    images = to_model_range(raw, dm.cfg.value_range)
    target = model.evaluation_target(images)
    tr_raw, tr_cat, tr_num = (t.to(model.device) for t in dm.split_images("train"))
    print(f"{len(images)} test images; fitting the adherence classifier on {len(tr_raw)} training images", flush=True)
    classifier = fit_condition_classifier(to_model_range(tr_raw, dm.cfg.value_range), tr_cat, tr_num, model.schema,
                                          seed=cfg.mask_seed)
    tokens = torch.tensor(model.schema.mask_tokens(), device=cat.device)
    known_cat, known_num = cat != tokens, ~torch.isnan(num)
    real = _scores(model.schema, _predict(classifier, images), cat, num, known_cat, known_num)
    majority = majority_per_condition(model.schema, cat, num, tr_cat, tr_num)
    informative = [name for name in real if real[name] > majority[name] + 0.05]
    conditions = level_masks(model, cat, num, 0.0, mask_draws(cat, num, cfg))
    z = torch.randn((len(images), *model.latent_shape), generator=torch.Generator().manual_seed(cfg.paper_z_seed))
    z = z.to(model.device)
    model.set_sampling(sampler="ddim", steps=args.reference_steps, eta=0.0)
    print(f"reference: DDIM-{args.reference_steps}", flush=True)
    converged = model.generate(conditions, z=z)
    rows = []
    for sampler, steps in runs:
        model.set_sampling(sampler=sampler, steps=steps)
        model.generate(conditions.rows(0, 2), z=z[:2])  # warm-up (diffusers' first call imports and builds)
        start = time.perf_counter()
        generated = model.generate(conditions, z=z)
        seconds = time.perf_counter() - start
        scores = _scores(model.schema, _predict(classifier, generated), cat, num, known_cat, known_num)
        spread = diversity(model, images, cat, num, cfg)
        same = spread.iloc[0]
        deterministic = sampler not in ("ddpm",) and not (sampler == "ddim" and model.sampling.eta > 0)
        row = {"sampler": sampler, "steps": steps, "mse": float((generated - target).pow(2).mean()),
               "mse_to_converged": float((generated - converged).pow(2).mean()) if deterministic else float("nan"),
               "adherence_mean": float(np.mean([scores[n] for n in informative])),
               **{f"adherence/{n}": scores[n] for n in informative},
               "diversity_ratio": float(same["generated/real"]), "seconds_per_image": seconds / len(images)}
        rows.append(row)
        print(f"{sampler}-{steps}: MSE {row['mse']:.4f}, to converged {row['mse_to_converged']:.5f}, adherence {row['adherence_mean']:.3f}, diversity "
              f"{row['diversity_ratio']:.2f}, {1000 * row['seconds_per_image']:.1f} ms/image", flush=True)
    table = pd.DataFrame(rows)
    table["time_vs_first"] = table["seconds_per_image"] / table["seconds_per_image"].iloc[0]
    reference = {"sampler": "real images", "steps": 0, "mse": float("nan"),
                 "adherence_mean": float(np.mean([real[n] for n in informative])),
                 **{f"adherence/{n}": real[n] for n in informative}, "diversity_ratio": 1.0}
    baseline = {"sampler": "mean training image", "steps": 0,
                "mse": float((to_model_range(tr_raw, dm.cfg.value_range).float().mean(0, keepdim=True)
                              .to(target.device) - target).pow(2).mean()),
                "adherence_mean": float(np.mean([majority[n] for n in informative])), "diversity_ratio": 0.0}
    table = pd.concat([table, pd.DataFrame([reference, baseline])], ignore_index=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "samplers.csv", index=False, float_format="%.6g")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table[["sampler", "steps", "mse", "mse_to_converged", "adherence_mean", "diversity_ratio", "seconds_per_image",
                     "time_vs_first"]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    plot(table, informative, out / "samplers.png", baseline)
    print(f"written to {out}/samplers.csv and samplers.png (adherence over {', '.join(informative)})")
    return 0


def plot(table, informative, path: Path, baseline: dict) -> None:
    from modules.plotting import save_figure

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = table[table["steps"] > 0]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for sampler, group in runs.groupby("sampler", sort=False):
        group = group.sort_values("steps")
        for ax, key in zip(axes, ("adherence_mean", "mse", "diversity_ratio", "mse_to_converged")):
            ax.plot(group["steps"], group[key], marker="o", label=sampler)
    real = table[table["sampler"] == "real images"].iloc[0]
    axes[0].axhline(real["adherence_mean"], color="k", ls="--", lw=1, label="real images")
    axes[0].axhline(baseline["adherence_mean"], color="grey", ls=":", lw=1, label="majority class")
    axes[1].axhline(baseline["mse"], color="grey", ls=":", lw=1, label="mean training image")
    axes[2].axhline(1.0, color="k", ls="--", lw=1, label="real images")
    titles = (f"adherence (mean over {len(informative)} informative conditions) ↑", "pixel MSE to D(E(x)) ↓",
              "diversity, same conditions (generated / real)", "pixel MSE to the converged DDIM images ↓")
    axes[3].set_yscale("log")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("sampling steps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())

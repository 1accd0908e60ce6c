"""Benchmark: the paper's BIKED table and what the mcVAE configs generate, beside the baselines, on the authors'
split and on the project's split seeds.

    python benchmarks/bench_mcvae.py                      # both configs, the authors' split × training seeds
                                                          # 42-44 and split seeds 0-4 (16 runs, ≈ 10 min on 2 cores)
    python benchmarks/bench_mcvae.py --configs mcvae_biked_paper --authors_setup   # the authors' loss, init, no EMA
    python benchmarks/bench_mcvae.py --epochs 5 --split_seeds 0 --train_seeds 42   # smoke test

Every run is `train_mcvae.py` with its evaluation (`evaluate.py`'s tables): per-sparsity single-z SSE (the paper's
protocol), energy score, mean-of-k and best-of-k SSE, the baselines on the same masks, adherence, diversity and
validity. The first run of each config is timed alone (whole command, `fit` and evaluation); the others run
`--workers` at a time, or with `--stack` stacked in one process per worker (`modules/stacked.py`: the runs of a
config on one split case train together; their weights agree with separate runs to float rounding).

Printed, and written to benchmarks/results/bench_mcvae[_authors].{json,md}:
1. the paper table (single-z SSE at sparsity 0 / 0.5 / 0.9 and the mean over the ten levels) on the authors'
   split (data.split.protocol: authors; mean ± sd over training seeds) next to the paper's numbers;
2. the same on the project's split seeds (mean ± sd over split seeds);
3. generative quality per config on both: energy score, diversity ratio, adherence at s = 0 against the real
   designs on the informative conditions, validity, with the baselines' energy scores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Paper, BIKED mcVAE, linear sparsity 0.1 → 0.2, per-design SSE (normalised) at evaluation sparsity 0.0 … 0.9
PAPER = {"0.0": 0.0732, "0.5": 0.0899, "0.9": 0.1107, "mean": 0.0883}
AUTHORS_SETUP = {"model.reconstruction": "sse", "model.ema_decay": None, "model.init": "pytorch",
                 "conditioning.numerical_mask": "sentinel"}
LEVELS = ("0.0", "0.5", "0.9", "mean")  # the paper's table
BASELINES = {"train_mean": "train_mean_sse", "conditional_forest": "conditional_forest_sse"}
BASELINE_ES = {"train_mean": "train_mean_energy_score", "conditional_forest": "conditional_forest_energy_score",
               "train_sample": "train_sample_energy_score"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["mcvae_biked_paper", "mcvae_biked"],
                   help="config names (configs/NAME.yaml) or paths")
    p.add_argument("--split_seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4],
                   help="project split seeds (training seed: the config's)")
    p.add_argument("--train_seeds", type=int, nargs="*", default=[42, 43, 44],
                   help="training seeds on the authors' split")
    p.add_argument("--epochs", type=int, help="override trainer.max_epochs (default: the config's)")
    p.add_argument("--authors_setup", action="store_true",
                   help="the authors' loss reduction (sse), sentinel −1, PyTorch init and no EMA in every config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotted config override for every run (e.g. evaluation.samples_per_design=8)")
    p.add_argument("--csv_path", help="the data file (default: the configs')")
    p.add_argument("--workers", type=int, default=2, help="runs at a time after the timed first one (each 1 thread)")
    p.add_argument("--stack", action="store_true",
                   help="after the timed runs, train the runs of each config and split case stacked in one process "
                        "(python -m modules.stacked; one stack per worker)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def _overrides(args) -> dict:
    fixed = dict(AUTHORS_SETUP) if args.authors_setup else {}
    for pair in args.set:
        key, _, value = pair.partition("=")
        fixed[key] = yaml.safe_load(value)
    if args.epochs:
        fixed["trainer.max_epochs"] = args.epochs
    if args.csv_path:
        fixed["data.csv_path"] = str(Path(args.csv_path).resolve())
    return fixed


def plan(args) -> list[dict]:
    """One entry per run: config, split case ('authors' or 'split N'), overrides."""
    runs = []
    for config in args.configs:
        for seed in args.train_seeds:
            runs.append({"config": config, "case": "authors", "seed": seed,
                         "overrides": {"data.split": {"protocol": "authors", "seed": 0}, "trainer.seed": seed}})
        for seed in args.split_seeds:
            runs.append({"config": config, "case": "project", "seed": seed,
                         "overrides": {"data.split.seed": seed}})
    return runs


def _run(cmd: list[str]) -> tuple[str, float]:
    """(stdout, wall seconds) of a training command run from the repository root (W&B off unless set)."""
    started = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result.stdout, time.perf_counter() - started


def execute(run: dict, fixed: dict, out: Path) -> dict:
    """Train and evaluate one run; returns the run with its timings and run directory."""
    from experiments.sweep import make_config

    name = f"{Path(run['config']).stem}_{run['case']}{run['seed']}"
    config = make_config(run["config"], {**fixed, **run["overrides"]}, out / "configs" / f"{name}.yaml")
    stdout, wall = _run([sys.executable, "train_mcvae.py", "--config", str(config), "--logdir", str(out / "logs"),
                         "--name", name])
    fit = re.search(r"trained (\d+) epochs in ([0-9.]+) s", stdout)
    evaluated = re.search(r"evaluated in ([0-9.]+) s", stdout)
    run_dir = Path(re.findall(r"run directory: (.+)", stdout)[-1].strip())
    return {**run, "name": name, "run_dir": str(run_dir), "wall_seconds": round(wall, 2),
            "epochs": int(fit.group(1)), "fit_seconds": float(fit.group(2)),
            "eval_seconds": float(evaluated.group(1)) if evaluated else None}


def execute_stack(runs: list[dict], fixed: dict, out: Path) -> list[dict]:
    """Train and evaluate runs that share an architecture stacked in one process (`python -m modules.stacked`)."""
    from experiments.sweep import make_config

    names = [f"{Path(r['config']).stem}_{r['case']}{r['seed']}" for r in runs]
    configs = [str(make_config(r["config"], {**fixed, **r["overrides"]}, out / "configs" / f"{name}.yaml"))
               for r, name in zip(runs, names)]
    stdout, wall = _run([sys.executable, "-m", "modules.stacked", *configs, "--logdir", str(out / "logs")])
    run_dirs = [line.split(": ", 1)[1].strip() for line in stdout.splitlines() if line.startswith("run directory: ")]
    epochs = int(re.search(r"stacked models × (\d+) epochs", stdout).group(1))
    return [{**r, "name": name, "run_dir": run_dir, "wall_seconds": round(wall / len(runs), 2), "epochs": epochs,
             "fit_seconds": None, "eval_seconds": None, "stacked": len(runs)}
            for r, name, run_dir in zip(runs, names, run_dirs)]


def read_run(run: dict) -> dict:
    """The figures of one run's evaluation tables."""
    ev = Path(run["run_dir"]) / "eval"
    from modules.evaluation import error_table_path

    errors = pd.read_csv(error_table_path(ev), dtype={"sparsity": str})
    errors["sparsity"] = [s if s == "mean" else f"{float(s):.1f}" for s in errors["sparsity"]]
    errors = errors.set_index("sparsity")
    row = {f"{column}@{level}": float(errors.loc[level, column]) for column in errors.columns for level in errors.index}
    if "conditional_forest_energy_score" in errors:  # below the forest at every level?
        levels = errors.drop(index="mean")
        row["es_below_forest_levels"] = float((levels["energy_score"] < levels["conditional_forest_energy_score"]).mean())
    diversity = pd.read_csv(ev / "diversity.csv")
    row["diversity_ratio"] = float(diversity["generated/real"].iloc[0])
    validity = pd.read_csv(ev / "validity.csv").set_index("designs")
    generated0 = validity.index[1]  # the samples at the first evaluation sparsity
    row["in_training_range"] = float(validity.loc[generated0, "in_training_range"])
    if "all_checks" in validity:
        row["valid"] = float(validity.loc[generated0, "all_checks"])
        row["valid_real"] = float(validity.iloc[0]["all_checks"])
    row["nearest_train_ratio"] = float(validity.loc[generated0, "nearest_train_mean"]
                                       / validity.iloc[0]["nearest_train_mean"])
    adherence_path = ev / "adherence.csv"
    if adherence_path.is_file():
        adherence = pd.read_csv(adherence_path)
        first = [c for c in adherence.columns if re.fullmatch(r"[0-9.]+", c)][0]
        for _, r in adherence.iterrows():
            row[f"adherence:{r['condition']}"] = float(r[first])
            row[f"real:{r['condition']}"] = float(r["real"])
            row[f"majority:{r['condition']}"] = float(r["majority"])
            row[f"informative:{r['condition']}"] = bool(r["informative"])
    return row


def mean_sd(values) -> str:
    values = np.asarray(list(values), dtype=float)
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


def paper_table(frame: pd.DataFrame, case: str) -> pd.DataFrame:
    """Single-z SSE at the paper's levels, mean ± sd over the runs of `case`, per config, then the baselines."""
    part = frame[frame["case"] == case]
    rows = [{"": "paper (one run, the authors' split)", **{level: f"{PAPER[level]:.4f}" for level in LEVELS}}]
    for config, runs in part.groupby("config", sort=False):
        rows.append({"": config, **{level: mean_sd(runs[f"sse_paper@{level}"]) for level in LEVELS}})
    for baseline, column in BASELINES.items():
        if f"{column}@mean" in part:
            rows.append({"": f"baseline: {baseline}", **{level: mean_sd(part.drop_duplicates("seed")[f"{column}@{level}"])
                                                         for level in LEVELS}})
    return pd.DataFrame(rows).set_index("")


def quality_table(frame: pd.DataFrame, case: str) -> pd.DataFrame:
    """Per config: energy score (mean over levels and at s = 0), diversity ratio, adherence at s = 0 minus the
    real designs' (informative conditions), validity; then the baselines' energy scores."""
    part = frame[frame["case"] == case]
    informative = [c.split(":", 1)[1] for c in part.columns if c.startswith("informative:")
                   and part[c].mean() >= 0.5]  # informative on most splits
    rows = []
    for config, runs in part.groupby("config", sort=False):
        row = {"": config, "ES mean": mean_sd(runs["energy_score@mean"]), "ES s=0": mean_sd(runs["energy_score@0.0"]),
               "ES s=0.9": mean_sd(runs["energy_score@0.9"]), "diversity": mean_sd(runs["diversity_ratio"])}
        if "es_below_forest_levels" in runs:  # share of (run, level) pairs where the model's ES beats the forest's
            row["ES < forest"] = f"{runs['es_below_forest_levels'].mean():.0%}"
        for condition in informative:
            row[f"adh−real {condition[:12]}"] = mean_sd(runs[f"adherence:{condition}"] - runs[f"real:{condition}"])
        if "valid" in runs:
            row["valid"] = mean_sd(runs["valid"])
        row["in range"] = mean_sd(runs["in_training_range"])
        row["nearest/real"] = mean_sd(runs["nearest_train_ratio"])
        rows.append(row)
    unique = part.drop_duplicates("seed")
    for baseline, column in BASELINE_ES.items():
        if f"{column}@mean" in part:
            rows.append({"": f"baseline: {baseline}", "ES mean": mean_sd(unique[f"{column}@mean"]),
                         "ES s=0": mean_sd(unique[f"{column}@0.0"]), "ES s=0.9": mean_sd(unique[f"{column}@0.9"]),
                         "diversity": "—"})
    return pd.DataFrame(rows).set_index("").fillna("—")


def to_markdown(table: pd.DataFrame) -> str:
    """A pipe table (pandas' own needs the tabulate package)."""
    header = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(index), *map(str, row)]) + " |" for index, row in zip(table.index, table.values)]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    fixed = _overrides(args)
    runs = plan(args)
    if not runs:
        raise SystemExit("nothing to run: give --split_seeds and/or --train_seeds")
    print(f"{len(runs)} runs: {', '.join(args.configs)} × (authors' split, training seeds {args.train_seeds}; "
          f"split seeds {args.split_seeds})", flush=True)
    timed, rest, seen = [], [], set()
    for run in runs:  # the first run of each config alone, for its timing
        (rest if run["config"] in seen else timed).append(run)
        seen.add(run["config"])
    done = []
    for run in timed:
        result = execute(run, fixed, out)
        print(f"  {result['name']} (timed alone): fit {result['fit_seconds']:.1f} s, whole command "
              f"{result['wall_seconds']:.1f} s", flush=True)
        done.append(result)
    if args.stack:  # one stack per (config, split case), cut into --workers stacks
        groups: dict[tuple, list[dict]] = {}
        for run in rest:
            groups.setdefault((run["config"], run["case"]), []).append(run)
        n = max(1, args.workers)
        stacks = [members[j::n] for members in groups.values() for j in range(min(n, len(members)))]
        with ThreadPoolExecutor(n) as pool:
            for results in pool.map(lambda s: execute_stack(s, fixed, out), stacks):
                print(f"  {len(results)} stacked ({', '.join(r['name'] for r in results)}): "
                      f"{sum(r['wall_seconds'] for r in results):.1f} s", flush=True)
                done.extend(results)
    else:
        with ThreadPoolExecutor(max(1, args.workers)) as pool:
            for result in pool.map(lambda r: execute(r, fixed, out), rest):
                print(f"  {result['name']}: {result['wall_seconds']:.1f} s", flush=True)
                done.append(result)
    frame = pd.DataFrame([{**{k: v for k, v in r.items() if k != "overrides"}, **read_run(r)} for r in done])
    tag = "_authors" if args.authors_setup else ""
    sections = [f"machine: {platform.machine()}, {os.cpu_count()} cores; epochs {done[0]['epochs']}"
                + (" with the authors' setup" if args.authors_setup else "")]
    sections += [f"timing ({r['config']}, alone): fit {r['fit_seconds']:.1f} s, whole training command with "
                 f"evaluation {r['wall_seconds']:.1f} s, evaluation {r['eval_seconds']} s" for r in done[:len(timed)]]
    tables = {}
    for case, title in (("authors", "authors' split (85/15, random_state 43), mean ± sd over training seeds"),
                        ("project", "project splits (80/10/10), mean ± sd over split seeds")):
        if (frame["case"] == case).any():
            tables[f"paper_{case}"] = (f"Single-z SSE (the paper's protocol), {title}:", paper_table(frame, case))
            tables[f"quality_{case}"] = (f"Generative quality, {title} (ES: energy score, lower is better; "
                                         "adh−real: adherence at s = 0 minus the real designs'):",
                                         quality_table(frame, case))
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print("\n" + "\n".join(sections))
        for heading, table in tables.values():
            print(f"\n{heading}\n{table.to_string()}")
    markdown = ["\n".join(sections)] + [f"{heading}\n\n{to_markdown(table)}" for heading, table in tables.values()]
    (out / f"bench_mcvae{tag}.md").write_text("\n\n".join(markdown) + "\n")
    frame.to_csv(out / f"bench_mcvae{tag}_runs.csv", index=False)
    (out / f"bench_mcvae{tag}.json").write_text(json.dumps(
        {"configs": args.configs, "authors_setup": args.authors_setup,
         "timing": {r["config"]: {k: r[k] for k in ("fit_seconds", "wall_seconds", "eval_seconds", "epochs")}
                    for r in done[:len(timed)]},
         "tables": {name: table.reset_index().to_dict(orient="records") for name, (_, table) in tables.items()}},
        indent=2, default=float))
    print(f"\nwritten to {out}/bench_mcvae{tag}.{{md,json}} and bench_mcvae{tag}_runs.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())

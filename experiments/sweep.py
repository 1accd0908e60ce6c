"""Resumable grids of mcVAE training + evaluation runs, and the tables and figures of the experiments.

A *cell* is a dict of dotted config overrides, e.g. ``{"sparsity.schedule": "cosine", "sparsity.initial": 0.0,
"sparsity.target": 0.3}``. Every cell runs the real training job (``modules.training.train_main``, the job of
``train_mcvae.py``) with its evaluation, in a worker process; the evaluation tables of the run become one row.
Each finished cell is written to ``<out>/cells/<cell_id>.json`` at once (atomically), so a sweep that is killed
loses only the cells in flight and a rerun of the same command skips the cells already done.

    python -m experiments.sweep sparsity --out experiments/results/sparsity_schedules --workers 2
    python -m experiments.sweep dataset_size --out experiments/results/dataset_size --fractions 0.1 0.25 0.5 1.0
    python -m experiments.sweep hparams --out logs/hp --grid model.kl_weight=0.5,0.7,0.9 --grid model.latent_dim=6,10

Run directories (checkpoints, logs) go to ``logs/sweeps/<out name>/`` (``--logdir``); ``<out>`` keeps only the
cell results, ``results.csv``, the tables, the figures and ``meta.json`` (command, commit, timings).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
LEVELS = [f"{0.1 * i:.1f}" for i in range(10)]  # evaluation sparsity levels, as the eval tables name them
SCHEDULES = ("constant", "step", "linear", "exponential", "cosine")
# overrides that make an evaluation cheaper without touching the paper-protocol error per sparsity
FAST_EVAL = {"evaluation.adherence": False, "evaluation.prior_draws": 1}


# --------------------------------------------------------------------------- cells and configs


def _value_text(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def cell_id(overrides: dict, context: Optional[dict] = None) -> str:
    """A readable, stable id: the overrides' last key parts and values plus a hash of everything that defines the
    run (`context`: epochs, data file, base config, fixed overrides), so a changed setting never resumes."""
    readable = "_".join(f"{k.split('.')[-1]}={_value_text(v)}" for k, v in sorted(overrides.items()))
    readable = re.sub(r"[^A-Za-z0-9=._-]+", "-", readable)[:80] or "base"
    key = json.dumps({"cell": overrides, "context": context or {}}, sort_keys=True, default=str)
    return f"{readable}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _base_config_path(base_config: str | Path) -> Path:
    path = Path(base_config)
    if path.suffix in (".yaml", ".yml"):
        return path if path.is_absolute() else (Path.cwd() / path if (Path.cwd() / path).is_file() else ROOT / path)
    return ROOT / "configs" / f"{base_config}.yaml"


def make_config(base_config: str | Path, overrides: dict, path: Path) -> Path:
    """The base config with dotted overrides applied, written to `path`; a relative data path is made absolute."""
    from modules.config import set_dotted

    cfg = yaml.safe_load(_base_config_path(base_config).read_text())
    for key, value in overrides.items():
        set_dotted(cfg, key, value)
    csv = Path(cfg["data"]["csv_path"])
    if not csv.is_absolute():
        cfg["data"]["csv_path"] = str(ROOT / csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def grid(**axes: Iterable) -> list[dict]:
    """The product of the axes: grid(**{"model.kl_weight": [0.5, 0.7], "trainer.seed": [0, 1]}) → 4 cells."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(list(axes[k]) for k in keys))]


def sparsity_cells(schedules: Iterable[str] = SCHEDULES, initials: Iterable[float] = (0.0, 0.1),
                   targets: Iterable[float] = (0.2, 0.5), seeds: Iterable[int] = (0,)) -> list[dict]:
    """Every schedule over initial × target (target ≥ initial); `constant` only needs its initial value."""
    cells = []
    for schedule in schedules:
        pairs = ([(i, None) for i in initials] if schedule == "constant"
                 else [(i, t) for i in initials for t in targets if t >= i and t != i])
        for (initial, target), seed in itertools.product(pairs, seeds):
            cell = {"sparsity.schedule": schedule, "sparsity.initial": float(initial)}
            if target is not None:
                cell["sparsity.target"] = float(target)
            cell["trainer.seed"] = int(seed)
            cells.append(cell)
    return cells


def dataset_size_cells(fractions: Iterable[float] = (0.1, 0.25, 0.5, 1.0), seeds: Iterable[int] = (0, 1, 2)) -> list[dict]:
    return grid(**{"data.split.train_fraction": [float(f) for f in fractions], "trainer.seed": [int(s) for s in seeds]})


# --------------------------------------------------------------------------- running one cell


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_run(run_dir: Path) -> dict:
    """One flat row from a run directory's evaluation tables (and its split and metrics)."""
    run_dir = Path(run_dir)
    ev = run_dir / "eval"
    row: dict[str, Any] = {}
    from modules.evaluation import error_table_path

    mse = pd.read_csv(error_table_path(ev), dtype={"sparsity": str})
    mse["sparsity"] = [s if s == "mean" else f"{float(s):.1f}" for s in mse["sparsity"]]
    for column in [c for c in mse.columns if c != "sparsity"]:
        for level, value in zip(mse["sparsity"], mse[column]):
            row[f"{column}_{level}"] = float(value)
    if (ev / "adherence.csv").is_file():
        adh = pd.read_csv(ev / "adherence.csv")
        levels = [c for c in adh.columns if re.fullmatch(r"[0-9.]+", c)]
        for c in levels:
            row[f"adherence_{float(c):.1f}"] = float(adh[c].mean())  # mean over conditions (accuracy or R²)
        row["adherence_mean"] = float(adh[levels].mean().mean())
        row["adherence_real"] = float(adh["real"].mean())
    if (ev / "diversity.csv").is_file():
        div = pd.read_csv(ev / "diversity.csv")
        row["diversity_ratio_same_conditions"] = float(div["generated/real"].iloc[0])
        row["diversity_ratio_unconditional"] = float(div["generated/real"].iloc[-1])
    split = pd.read_csv(run_dir / "split.csv")
    row["n_train"] = int((split["split"] == "train").sum())
    metrics = pd.read_csv(run_dir / "metrics.csv")
    for column in ("val_loss", "train_loss"):
        if column in metrics and metrics[column].notna().any():
            row[f"final_{column}"] = float(metrics[column].dropna().iloc[-1])
    return row


def run_cell(overrides: dict, cid: str, cells_dir: str, logdir: str, base_config: str, fixed: dict,
             quiet: bool = True) -> dict:
    """Train and evaluate one cell (in this process); writes and returns its row."""
    import torch

    torch.set_num_threads(1)
    from modules.registry import MCVAE_SPEC
    from modules.training import train_main

    cell_logdir = Path(logdir) / cid
    cell_logdir.mkdir(parents=True, exist_ok=True)
    config = make_config(base_config, {**fixed, **overrides}, cell_logdir / "config.yaml")
    before = set(cell_logdir.iterdir())
    started = time.perf_counter()
    log = cell_logdir / "train.log"
    with _output_to(log, quiet):
        code = train_main(["--config", str(config), "--logdir", str(cell_logdir), "--name", "run"], MCVAE_SPEC)
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"cell {cid} failed with exit code {code}; see {log}")
    new = sorted((p for p in set(cell_logdir.iterdir()) - before if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return _write_row(overrides, cid, new[-1], seconds, cells_dir)


@contextlib.contextmanager
def _output_to(log: Path, quiet: bool):
    """With `quiet`, this process's output goes to `log`; in a worker process its file descriptors too, so that
    Lightning's loggers and C-level output land there as well."""
    import multiprocessing

    if quiet and multiprocessing.current_process().name != "MainProcess":
        sys.stdout.flush(), sys.stderr.flush()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1), os.dup2(fd, 2)
        os.close(fd)
    with open(log, "a") as stream, (contextlib.redirect_stdout(stream) if quiet else contextlib.nullcontext()), \
            (contextlib.redirect_stderr(stream) if quiet else contextlib.nullcontext()):
        yield


def _write_row(overrides: dict, cid: str, run_dir: Path, seconds: float, cells_dir: str) -> dict:
    """A finished cell's row (its overrides and its run's tables), written to <cells_dir>/<cid>.json atomically."""
    row = {"cell_id": cid, **overrides, **read_run(run_dir), "seconds": round(seconds, 2),
           "run_dir": os.path.relpath(run_dir, ROOT) if str(run_dir).startswith(str(ROOT)) else str(run_dir)}
    _atomic_write(Path(cells_dir) / f"{cid}.json", json.dumps(row, indent=1, default=str))
    return row


def run_stacked_cells(cells: list[dict], cids: list[str], cells_dir: str, logdir: str, base_config: str,
                      fixed: dict, quiet: bool = True) -> list[dict]:
    """Train and evaluate cells that share an architecture in one process, their models stacked
    (modules/stacked.py); writes and returns their rows, as `run_cell` does for one."""
    import torch

    torch.set_num_threads(1)
    from modules.stacked import load_mcvae_config, train_stacked
    from modules.training import make_run_dir

    configs, run_dirs = [], []
    for overrides, cid in zip(cells, cids):
        cell_logdir = Path(logdir) / cid
        cell_logdir.mkdir(parents=True, exist_ok=True)
        configs.append(load_mcvae_config(make_config(base_config, {**fixed, **overrides}, cell_logdir / "config.yaml")))
        run_dirs.append(make_run_dir(str(cell_logdir), "run"))
    log = Path(logdir) / f"stack-{cids[0]}.log"
    try:
        with _output_to(log, quiet):
            runs = train_stacked(configs, run_dirs, progress=not quiet)
    except Exception as err:
        raise RuntimeError(f"the stack of cells {', '.join(cids)} failed ({type(err).__name__}: {err}); see {log}") from err
    return [_write_row(overrides, cid, run.run_dir, run.seconds, cells_dir)
            for overrides, cid, run in zip(cells, cids, runs)]


def stacks(cells: list[dict], ids: list[str], base_config: str | Path, fixed: dict, logdir: Path, *,
           chunks: int = 1, max_stack: int = 32) -> list[list[int]]:
    """Indices of the cells per stack: cells whose configs differ only in what a stack lets differ
    (`modules.stacked.PER_MODEL_KEYS`) go together, each such group cut into `chunks` near-equal stacks (one per
    worker) of at most `max_stack` models; a cell that changes shapes (the latent size) stands alone."""
    from modules.stacked import load_mcvae_config, stack_signature

    groups: dict[str, list[int]] = {}
    for i, (overrides, cid) in enumerate(zip(cells, ids)):
        path = make_config(base_config, {**fixed, **overrides}, Path(logdir) / cid / "config.yaml")
        groups.setdefault(stack_signature(load_mcvae_config(path)[0]), []).append(i)
    out = []
    for members in groups.values():
        n = max(min(chunks, len(members)), -(-len(members) // max_stack))
        out += [members[j::n] for j in range(n)]
    return out


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        # changes to tracked files only: the results being written (untracked) do not change the code
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_cells(cells: list[dict], out: str | Path, *, base_config: str | Path = "mcvae_biked_paper", workers: int = 1,
              epochs: Optional[int] = None, csv_path: Optional[str] = None, fixed: Optional[dict] = None,
              logdir: Optional[str | Path] = None, progress: bool = True, quiet: bool = True,
              command: Optional[str] = None, stack: bool = False) -> pd.DataFrame:
    """Run every cell not done yet (workers > 0: that many processes; 0: in this process) and return all cells'
    rows, in the order of `cells`. `fixed` overrides apply to every cell; `epochs` and `csv_path` set
    trainer.max_epochs (None or the config's value: unchanged) and data.csv_path. With `stack`, cells that share
    an architecture train together in one process per worker (`stacks`, modules/stacked.py). Results:
    <out>/cells/*.json, <out>/results.csv, <out>/meta.json."""
    out = Path(out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    logdir = Path(logdir) if logdir else ROOT / "logs" / "sweeps" / out.name
    fixed = dict(fixed or {})
    if epochs is not None and int(epochs) != config_epochs(base_config, None):  # the config's own: same cells
        fixed["trainer.max_epochs"] = int(epochs)
    if csv_path is not None:
        fixed["data.csv_path"] = str(Path(csv_path).resolve())
    context = {"base_config": str(base_config), "fixed": fixed}
    ids = [cell_id(c, context) for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError("two cells have the same overrides")
    todo = [(c, i) for c, i in zip(cells, ids) if not (cells_dir / f"{i}.json").is_file()]
    started, stamp = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"cells ({out.name})", unit="cell")
    args = dict(cells_dir=str(cells_dir), logdir=str(logdir), base_config=str(_base_config_path(base_config)),
                fixed=fixed, quiet=quiet)
    jobs = [(run_cell, (cell, cid), 1) for cell, cid in todo]
    if stack and todo:
        groups = stacks([c for c, _ in todo], [i for _, i in todo], args["base_config"], fixed, logdir,
                        chunks=max(workers, 1))
        jobs = [(run_cell, todo[g[0]], 1) if len(g) == 1 else
                (run_stacked_cells, ([todo[i][0] for i in g], [todo[i][1] for i in g]), len(g)) for g in groups]
    try:
        if workers <= 0:
            for fn, job_args, n in jobs:
                fn(*job_args, **args)
                bar and bar.update(n)
        elif jobs:
            import multiprocessing

            pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
            try:
                pending = {pool.submit(fn, *job_args, **args): n for fn, job_args, n in jobs}
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        n = pending.pop(future)
                        future.result()  # a failed cell stops the sweep (the finished ones are kept)
                        if bar is not None:
                            bar.update(n)
            except BaseException:  # Ctrl-C or a failed cell: start nothing more (rerun to resume)
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
    finally:
        if bar is not None:
            bar.close()
    rows = [json.loads((cells_dir / f"{i}.json").read_text()) for i in ids]
    results = pd.DataFrame(rows)
    results.to_csv(out / "results.csv", index=False)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    run = {"command": command or " ".join(sys.argv), "commit": _git_commit(), "started": stamp,
           "wall_seconds": round(time.perf_counter() - started, 1), "cells": len(cells), "cells_run": len(todo),
           "workers": workers, "stacked": stack, "base_config": str(base_config), "fixed": fixed,
           "cell_seconds_total": round(float(results["seconds"].sum()), 1) if len(results) else 0.0}
    meta = {**run, "invocations": [*meta.get("invocations", []), run]}
    _atomic_write(meta_path, json.dumps(meta, indent=1, default=str))
    return results


# --------------------------------------------------------------------------- tables


def _columns(metric: str) -> list[str]:
    return [f"{metric}_{level}" for level in LEVELS] + [f"{metric}_mean"]


def _renamed(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    return frame.rename(columns={f"{metric}_{level}": level for level in [*LEVELS, "mean"]})


def sparsity_full_table(results: pd.DataFrame, metric: str = "sse_paper") -> pd.DataFrame:
    """Every (schedule, initial, target), MSE per evaluation sparsity and mean (mean over seeds)."""
    frame = results.copy()
    if "sparsity.target" not in frame:
        frame["sparsity.target"] = float("nan")
    frame["sparsity.target"] = frame["sparsity.target"].where(frame["sparsity.schedule"] != "constant", frame["sparsity.initial"])
    keys = ["sparsity.schedule", "sparsity.initial", "sparsity.target"]
    table = frame.groupby(keys, sort=False)[_columns(metric)].mean()
    table["seeds"] = frame.groupby(keys, sort=False).size()
    table = _renamed(table.reset_index(), metric).rename(columns={k: k.split(".")[-1] for k in keys})
    return table.sort_values(["schedule", "mean"], key=lambda s: s.map(SCHEDULES.index) if s.name == "schedule" else s,
                             ignore_index=True)


def sparsity_table(results: pd.DataFrame, metric: str = "sse_paper") -> pd.DataFrame:
    """The paper-style table: one row per schedule, its best (initial, target) by mean error."""
    full = sparsity_full_table(results, metric)
    best = full.loc[full.groupby("schedule", sort=False)["mean"].idxmin()]
    return best.set_index("schedule").reindex([s for s in SCHEDULES if s in set(best["schedule"])])


def schedule_areas(table: pd.DataFrame, epochs: int) -> pd.DataFrame:
    """The area under each training sparsity curve (sum of p over the epochs) and that area / epochs, the mean
    training sparsity. `table` has columns schedule, initial, target (e.g. a sparsity table)."""
    from modules.sparsity import SparsitySchedule

    frame = table.reset_index() if "schedule" not in table.columns else table
    rows = []
    for _, r in frame.iterrows():
        curve = SparsitySchedule(schedule=r["schedule"], initial=float(r["initial"]), target=float(r["target"])).curve(epochs)
        rows.append({"schedule": r["schedule"], "initial": r["initial"], "target": r["target"],
                     "area": sum(curve), "mean_training_sparsity": sum(curve) / epochs,
                     **({"mean_mse": r["mean"]} if "mean" in r else {})})
    return pd.DataFrame(rows)


def plot_sparsity(table: pd.DataFrame, epochs: int, path: Optional[str | Path] = None):
    """MSE vs evaluation sparsity per schedule (the best setting of each) and those schedules' training curves."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from modules.sparsity import SparsitySchedule

    frame = table.reset_index() if "schedule" not in table.columns else table
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for _, r in frame.iterrows():
        label = f"{r['schedule']} ({r['initial']:g}→{r['target']:g})"
        left.plot([float(x) for x in LEVELS], [r[x] for x in LEVELS], marker="o", label=label)
        curve = SparsitySchedule(schedule=r["schedule"], initial=float(r["initial"]), target=float(r["target"])).curve(epochs)
        right.plot(range(epochs), curve, drawstyle="steps-post", label=label)
    left.set_xlabel("evaluation sparsity")
    left.set_ylabel("per-design SSE (paper protocol)")
    left.set_title("error per evaluation sparsity (best setting per schedule)")
    right.set_xlabel("epoch")
    right.set_ylabel("training sparsity p")
    right.set_title("training sparsity curves")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


def dataset_size_table(results: pd.DataFrame, metric: str = "sse_paper") -> pd.DataFrame:
    """Per training fraction: mean and sd over seeds of the error per evaluation sparsity (and of adherence)."""
    key = "data.split.train_fraction"
    # adherence_real: the predictor's score on real test designs; it is fitted on the (smaller) training split too
    columns = [c for c in [*_columns(metric), *_columns("adherence"), "adherence_real"] if c in results]
    grouped = results.groupby(key)
    table = pd.concat({"mean": grouped[columns].mean(), "sd": grouped[columns].std()}, axis=1)
    table.columns = [f"{c}_{stat}" if stat == "sd" else c for stat, c in table.columns]
    table.insert(0, "n_train", grouped["n_train"].mean())
    table.insert(1, "seeds", grouped.size())
    table.index.name = "train_fraction"
    return table


def plot_dataset_size(results: pd.DataFrame, path: Optional[str | Path] = None, metric: str = "sse_paper",
                      levels: Iterable[str] = ("0.0", "0.5", "0.9", "mean")):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    table = dataset_size_table(results, metric)
    has_adherence = "adherence_mean" in table
    fig, axes = plt.subplots(1, 2 if has_adherence else 1, figsize=(11 if has_adherence else 6, 4), squeeze=False)
    x = table.index.to_numpy() * 100
    for prefix, ax, ylabel in ((metric, axes[0, 0], "per-design SSE (paper protocol)"),
                               ("adherence", axes[0, -1] if has_adherence else None, "mean adherence (acc. / R²)")):
        if ax is None:
            continue
        for level in levels:
            column = f"{prefix}_{level}"
            ax.errorbar(x, table[column], yerr=table.get(f"{column}_sd"), marker="o", capsize=3,
                        label=f"eval sparsity {level}" if level != "mean" else "mean over sparsities")
        if prefix == "adherence" and "adherence_real" in table:
            ax.plot(x, table["adherence_real"], "k--", marker=".", label="real test designs (reference)")
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}%" for v in x])
        ax.set_xlabel("training designs used (% of the training split)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title("error vs data-set size (mean ± sd over seeds)")
    if has_adherence:
        axes[0, -1].set_title("condition adherence vs data-set size")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


def hparam_table(results: pd.DataFrame, keys: Iterable[str], metric: str = "sse_paper") -> pd.DataFrame:
    """Mean over seeds per grid point, best (lowest mean error) first."""
    keys = list(keys)
    columns = [c for c in [f"{metric}_0.0", f"{metric}_0.5", f"{metric}_0.9", f"{metric}_mean", "sse_prior_mean",
                           "adherence_mean", "diversity_ratio_same_conditions", "final_val_loss", "seconds"] if c in results]
    grouped = results.groupby(keys)
    table = grouped[columns].mean()
    table["seeds"] = grouped.size()
    return table.sort_values(f"{metric}_mean")


def plot_hparams(table: pd.DataFrame, path: Optional[str | Path] = None, metric: str = "sse_paper"):
    """Mean error (over evaluation sparsities) of every grid point of a `hparam_table`, best at the top."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = [", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(table.index.names, key if isinstance(key, tuple) else (key,)))
              for key in table.index]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(table) + 1.5))
    ax.barh(range(len(table)), table[f"{metric}_mean"], color="tab:blue")
    ax.set_yticks(range(len(table)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean per-design SSE over evaluation sparsities 0.0…0.9")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


def write_sparsity_outputs(results: pd.DataFrame, out: Path, epochs: int) -> dict[str, pd.DataFrame]:
    table, full = sparsity_table(results), sparsity_full_table(results)
    areas = schedule_areas(full, epochs)
    table.to_csv(out / "sparsity_table.csv")
    full.to_csv(out / "sparsity_table_all.csv", index=False)
    areas.to_csv(out / "schedule_areas.csv", index=False)
    if "sse_prior_mean" in results:
        sparsity_table(results, "sse_prior").to_csv(out / "sparsity_table_prior.csv")
    import matplotlib.pyplot as plt

    plt.close(plot_sparsity(table, epochs, out / "sparsity_schedules.png"))
    return {"table": table, "full": full, "areas": areas}


def write_dataset_size_outputs(results: pd.DataFrame, out: Path) -> dict[str, pd.DataFrame]:
    table = dataset_size_table(results)
    table.to_csv(out / "dataset_size_table.csv")
    import matplotlib.pyplot as plt

    plt.close(plot_dataset_size(results, out / "dataset_size.png"))
    return {"table": table}


def notebook_out(out: Optional[str | Path], name: str) -> Path:
    """Where an experiments notebook writes its results: `out` when given (relative: to the repository root); by
    default <repo>/logs/notebooks/<name>/ (git-ignored), whose cells/ get the committed cells of
    experiments/results/<name>/. Finished cells are not retrained, so the defaults show the committed results,
    and nothing in experiments/results/ is rewritten (pass out="experiments/results/<name>" to update them)."""
    if out is not None:
        return Path(out) if Path(out).is_absolute() else ROOT / out
    folder = ROOT / "logs" / "notebooks" / name
    cells = folder / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    for committed in sorted((ROOT / "experiments" / "results" / name / "cells").glob("*.json")):
        copy = cells / committed.name
        if not copy.is_file() or copy.read_bytes() != committed.read_bytes():  # the committed numbers win
            shutil.copyfile(committed, copy)
    return folder


def config_epochs(base_config: str | Path, epochs: Optional[int]) -> int:
    return int(epochs or yaml.safe_load(_base_config_path(base_config).read_text())["trainer"]["max_epochs"])


# --------------------------------------------------------------------------- CLI


def _parse_assignment(text: str) -> tuple[str, list]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2,…, got {text!r}")
    key, values = text.split("=", 1)
    return key.strip(), [yaml.safe_load(v) for v in values.split(",")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="study", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="results folder (cells/, results.csv, tables, figures, meta.json)")
    common.add_argument("--workers", type=int, default=2, help="worker processes (0: in this process)")
    common.add_argument("--epochs", type=int, help="trainer.max_epochs (default: the config's)")
    common.add_argument("--seeds", type=int, nargs="+", default=None, help="trainer.seed values")
    common.add_argument("--csv_path", help="the data file (default: the config's)")
    common.add_argument("--base_config", default="mcvae_biked_paper",
                        help="config name in configs/ or a YAML path (default: the paper's mcVAE setting)")
    common.add_argument("--logdir", help="where run directories go (default logs/sweeps/<out name>)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=_parse_assignment,
                        help="a fixed override for every cell, e.g. --set evaluation.adherence=false")
    common.add_argument("--stack", action="store_true",
                        help="train the cells that share an architecture together, their models stacked in one "
                             "process per worker (modules/stacked.py; the weights agree with separate runs to "
                             "float rounding)")
    common.add_argument("--fast_eval", action="store_true",
                        help="evaluation.adherence=false, evaluation.prior_draws=1 (the paper-protocol error is unchanged)")
    sp = sub.add_parser("sparsity", parents=[common], help="the five schedules over initial × target sparsity")
    sp.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    sp.add_argument("--initials", type=float, nargs="+", default=[0.0, 0.1])
    sp.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.5])
    ds = sub.add_parser("dataset_size", parents=[common], help="train on fractions of the training split")
    ds.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    hp = sub.add_parser("hparams", parents=[common], help="a grid over any config keys")
    hp.add_argument("--grid", action="append", type=_parse_assignment, required=True, metavar="KEY=V1,V2,…")
    args = p.parse_args(argv)

    out = Path(args.out)
    fixed = {**(FAST_EVAL if args.fast_eval else {}), **{k: v[0] for k, v in args.set}}
    if args.study == "sparsity":
        cells = sparsity_cells(args.schedules, args.initials, args.targets, args.seeds or [0])
    elif args.study == "dataset_size":
        cells = dataset_size_cells(args.fractions, args.seeds or [0, 1, 2])
    else:
        axes = dict(args.grid)
        if args.seeds:
            axes["trainer.seed"] = args.seeds
        cells = grid(**axes)
    results = run_cells(cells, out, base_config=args.base_config, workers=args.workers, epochs=args.epochs,
                        csv_path=args.csv_path, fixed=fixed, logdir=args.logdir, stack=args.stack,
                        command="python -m experiments.sweep " + shlex.join(sys.argv[1:] if argv is None else argv))
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 4):
        if args.study == "sparsity":
            tables = write_sparsity_outputs(results, out, config_epochs(args.base_config, args.epochs))
            print(tables["table"].to_string())
            print(tables["areas"].to_string(index=False))
        elif args.study == "dataset_size":
            print(write_dataset_size_outputs(results, out)["table"].to_string())
        else:
            table = hparam_table(results, [k for k, _ in args.grid])
            table.to_csv(out / "hparam_table.csv")
            import matplotlib.pyplot as plt

            plt.close(plot_hparams(table, out / "hparams.png"))
            print(table.to_string())
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Throughput of many mcVAEs trained at once (issue 14): K cells of one config that differ in their training
seed, trained by the sweep's 2 worker processes either one run per cell (`train_mcvae.py --no_eval`, today's
sweep) or stacked (`modules/stacked.py`, one stack per worker), side by side in one run.

    python benchmarks/bench_stacked.py                                   # K = 1, 4, 8, 16, 26; 50 epochs (≈ 10 min)
    python benchmarks/bench_stacked.py --ks 8 --epochs 500               # the config's full length
    python benchmarks/bench_stacked.py --ks 4 --epochs 3 --configs mcvae_biked_paper   # smoke test

The figure is models × epochs per second of wall time for the whole pool (worker start, data, model building,
training, checkpoints; no evaluation, which does not stack), and the ratio of the stacked pool's to the separate
pool's for the same K. Each worker runs one torch thread, as the sweep's do. Written to
benchmarks/results/bench_stacked.{md,json}.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _quiet():
    import logging

    import pytorch_lightning  # noqa: F401  (Lightning sets its logger to INFO on import)
    import torch

    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


def train_separately(config: str, logdir: str) -> float:
    """One cell as today's sweep trains it: train_main in this worker, no evaluation; returns its wall seconds."""
    _quiet()
    from modules.registry import MCVAE_SPEC
    from modules.training import train_main

    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = train_main(["--config", config, "--logdir", logdir, "--no_eval"], MCVAE_SPEC)
    if code != 0:
        raise RuntimeError(f"train_main failed for {config} (exit code {code})")
    return time.perf_counter() - started


def train_stack(configs: list[str], logdir: str) -> float:
    """Cells trained as one stack in this worker, no evaluation; returns its wall seconds."""
    _quiet()
    from modules.stacked import load_mcvae_config, train_stacked
    from modules.training import make_run_dir

    started = time.perf_counter()
    loaded = [load_mcvae_config(c) for c in configs]
    run_dirs = [make_run_dir(logdir, Path(c).stem) for c in configs]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train_stacked(loaded, run_dirs, evaluate=False, progress=False)
    return time.perf_counter() - started


def pool_seconds(jobs: list[tuple], workers: int) -> float:
    """Wall seconds of a fresh spawn pool running `jobs` (fn, *args), worker start included."""
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(fn, *a) for fn, *a in jobs]:
            future.result()
    return time.perf_counter() - started


def cell_configs(config: str, k: int, epochs: int | None, out: Path) -> list[str]:
    from experiments.sweep import make_config

    overrides = {"trainer.max_epochs": epochs} if epochs else {}
    return [str(make_config(config, {**overrides, "trainer.seed": 1000 + i},
                            out / "configs" / f"k{k}_cell{i}.yaml")) for i in range(k)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["mcvae_biked"])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16, 26])
    p.add_argument("--epochs", type=int, default=50, help="trainer.max_epochs of every cell (0: the config's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    out = Path(args.results)
    scratch = out / "bench_stacked_runs"
    from experiments.sweep import config_epochs

    rows = []
    for config in args.configs:
        epochs = config_epochs(config, args.epochs or None)
        for k in args.ks:
            paths = cell_configs(config, k, args.epochs or None, scratch)
            logdir = str(scratch / "logs")
            separate = pool_seconds([(train_separately, c, logdir) for c in paths], args.workers)
            n = max(1, min(args.workers, k))
            stacked = pool_seconds([(train_stack, paths[j::n], logdir) for j in range(n)], args.workers)
            row = {"config": config, "K": k, "epochs": epochs, "workers": args.workers,
                   "separate_s": round(separate, 2), "stacked_s": round(stacked, 2),
                   "separate_models_epochs_per_s": round(k * epochs / separate, 2),
                   "stacked_models_epochs_per_s": round(k * epochs / stacked, 2),
                   "speedup": round(separate / stacked, 2)}
            rows.append(row)
            print(f"{config}, K = {k}: separate {separate:.1f} s ({row['separate_models_epochs_per_s']} models·epochs/s), "
                  f"stacked {stacked:.1f} s ({row['stacked_models_epochs_per_s']} models·epochs/s): "
                  f"{row['speedup']}×", flush=True)
    header = (f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.workers} worker processes of one "
              f"thread; cells differ in trainer.seed; wall of the whole pool, no evaluation")
    lines = [header, "", "| config | K | epochs | separate: s | models·epochs/s | stacked: s | models·epochs/s | × |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['K']} | {r['epochs']} | {r['separate_s']} | {r['separate_models_epochs_per_s']} | "
              f"{r['stacked_s']} | {r['stacked_models_epochs_per_s']} | {r['speedup']} |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_stacked.md").write_text("\n".join(lines) + "\n")
    (out / "bench_stacked.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print("\n" + "\n".join(lines) + f"\n\nwritten to {out}/bench_stacked.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training speed of mcVAE configs, measured side by side in one process: 500 epochs (`fit`) of each config, the
configs alternating, `--repeats` times; the median and the ratio to the first config.

    python benchmarks/bench_mcvae_speed.py                              # mcvae_biked_paper vs mcvae_biked (≈ 2 min)
    python benchmarks/bench_mcvae_speed.py --configs mcvae_biked --repeats 3

Machines of one kind differ by up to 2×, and a neighbour's load moves a single timing by 20 %: compare the ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def quiet_lightning_logs() -> None:
    """No model summaries between the timings (after the import: Lightning sets its logger to INFO there)."""
    import logging

    import pytorch_lightning  # noqa: F401

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


def fit_seconds(config: str, epochs: int | None, logdir: Path) -> float:
    """`fit` seconds of one training run (no evaluation), as train_mcvae.py reports them."""
    from experiments.sweep import make_config
    from modules.registry import MCVAE_SPEC
    from modules.training import train_main

    overrides = {"trainer.max_epochs": epochs} if epochs else {}
    path = make_config(config, overrides, logdir / f"{Path(config).stem}.yaml")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        train_main(["--config", str(path), "--logdir", str(logdir), "--no_eval"], MCVAE_SPEC)
    return float(re.search(r"trained \d+ epochs in ([0-9.]+) s", printed.getvalue()).group(1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["mcvae_biked_paper", "mcvae_biked"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--epochs", type=int, help="override trainer.max_epochs (default: the configs')")
    p.add_argument("--logdir", default=str(ROOT / "benchmarks" / "results" / "speed"))
    args = p.parse_args(argv)
    quiet_lightning_logs()
    seconds = {config: [] for config in args.configs}
    for repeat in range(args.repeats):
        for config in args.configs:
            seconds[config].append(fit_seconds(config, args.epochs, Path(args.logdir)))
            print(f"repeat {repeat + 1}, {config}: fit {seconds[config][-1]:.1f} s", flush=True)
    reference = statistics.median(seconds[args.configs[0]])
    print()
    for config, values in seconds.items():
        median = statistics.median(values)
        print(f"{config}: median fit {median:.1f} s over {len(values)} runs ({', '.join(f'{v:.1f}' for v in values)}); "
              f"{median / reference:.2f}× {args.configs[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training speed of mcVAE configs, measured side by side in one process: 500 epochs (`fit`) of each config, the
configs alternating, `--repeats` times; the median and the ratio to the first config.

    python benchmarks/bench_mcvae_speed.py                              # mcvae_biked_paper vs mcvae_biked (≈ 2 min)
    python benchmarks/bench_mcvae_speed.py --configs mcvae_biked --repeats 3
    python benchmarks/bench_mcvae_speed.py --authors ../Masked_Conditioning   # + the authors' loop (issue 14)

With `--authors PATH` (a copy of github.com/Phillip-M97/Masked_Conditioning) every repeat also times the authors'
published loop (`benchmarks/authors_mcvae.py`) for `--authors_epochs` epochs on the first config's split, and the
report gives seconds per epoch for all and each config's speed-up over the authors' (their median epoch over our
median `fit` per epoch). Without it the authors' loop is skipped, and the report says so.

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
    p.add_argument("--authors", help="root of a copy of the authors' repository: time their loop side by side")
    p.add_argument("--authors_epochs", type=int, default=30, help="epochs of the authors' loop per repeat")
    args = p.parse_args(argv)
    quiet_lightning_logs()
    authors_code = authors_data = None
    if args.authors:
        from benchmarks.authors_mcvae import authors_namespace

        authors_code = authors_namespace(args.authors)  # a wrong path fails now, not after the first training
        authors_data = datamodule_of(args.configs[0])
    from experiments.sweep import config_epochs

    seconds = {config: [] for config in args.configs}
    epochs = {config: config_epochs(config, args.epochs) for config in args.configs}
    authors: list[float] = []
    for repeat in range(args.repeats):
        if authors_code is not None:
            from benchmarks.authors_mcvae import time_authors_loop

            per_epoch = time_authors_loop(authors_code, authors_data, epochs=args.authors_epochs)
            authors.extend(per_epoch)
            print(f"repeat {repeat + 1}, the authors' loop: median {statistics.median(per_epoch):.4f} s/epoch "
                  f"over {len(per_epoch)} epochs", flush=True)
        for config in args.configs:
            seconds[config].append(fit_seconds(config, args.epochs, Path(args.logdir)))
            print(f"repeat {repeat + 1}, {config}: fit {seconds[config][-1]:.1f} s", flush=True)
    reference = statistics.median(seconds[args.configs[0]])
    print()
    if authors:
        print(f"the authors' loop: median {statistics.median(authors):.4f} s/epoch over {len(authors)} epochs")
    else:
        print("the authors' loop: not timed (pass --authors PATH, a copy of github.com/Phillip-M97/Masked_Conditioning)")
    for config, values in seconds.items():
        median = statistics.median(values)
        per_epoch = median / epochs[config]
        if not authors:
            versus = ""
        elif per_epoch > 0:
            versus = f"; {statistics.median(authors) / per_epoch:.2f}× the authors' loop"
        else:  # train_main prints the fit to 0.01 s: a tiny smoke run can read 0.00
            versus = "; too short to compare with the authors' loop (fit under 0.005 s)"
        print(f"{config}: median fit {median:.1f} s over {len(values)} runs ({', '.join(f'{v:.1f}' for v in values)}), "
              f"{per_epoch:.4f} s/epoch; {median / reference:.2f}× {args.configs[0]}{versus}")
    return 0


def built(config: str):
    """(config, data module, initial model) of `config` (a name in configs/ or a YAML path), as training builds
    them (the model under torch seed 0)."""
    import torch

    from modules.registry import MCVAE_SPEC
    from modules.training import common_parser, load_run_config

    flag = ["--config", config] if config.endswith((".yaml", ".yml")) else ["--cfg_name", config]
    cfg, _ = load_run_config(common_parser("speed").parse_args(flag), MCVAE_SPEC.config_cls, check=MCVAE_SPEC.check,
                             extra_flags=MCVAE_SPEC.extra_flags)
    torch.manual_seed(0)
    dm, model = MCVAE_SPEC.build(cfg, None)
    return cfg, dm, model


def datamodule_of(config: str):
    """The data module (split, scaled designs, encoded conditions) that `config` trains on."""
    return built(config)[1]


if __name__ == "__main__":
    sys.exit(main())

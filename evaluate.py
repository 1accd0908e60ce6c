"""Evaluate a checkpoint: `python evaluate.py --ckpt logs/<run>/checkpoints/last.ckpt [--split test] [--out DIR]`.

Writes per-sparsity error, condition adherence and diversity tables with plots (see README, Evaluation).
"""
import argparse
import sys
from pathlib import Path

from modules.errors import UserError, cli_entry
from modules.sampling_cli import add_device_argument, add_sampling_arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint (.ckpt) of any model of this project")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="data split to evaluate on")
    p.add_argument("--out", help="output folder (default: <run>/eval for a run's last.ckpt, <run>/eval_<ckpt name> for "
                                 "its other checkpoints, else eval_<ckpt name>/ beside the checkpoint)")
    p.add_argument("--csv_path", help="data file, when it has moved since training")
    add_device_argument(p)
    add_sampling_arguments(p)
    return p.parse_args(argv)


def default_out(ckpt: Path, split: str) -> Path:
    from modules.training import run_dir_of_checkpoint

    run_dir = run_dir_of_checkpoint(ckpt)
    suffix = "" if split == "test" else f"_{split}"
    if run_dir is not None:
        return run_dir / f"eval_{ckpt.stem}{suffix}" if ckpt.stem != "last" else run_dir / f"eval{suffix}"
    return ckpt.parent / f"eval_{ckpt.stem}{suffix}"


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    from modules.sampling_cli import apply_sampling_arguments, model_device
    from modules.registry import spec_for
    from modules.training import quiet_lightning, read_checkpoint

    quiet_lightning()
    ckpt = Path(args.ckpt)
    out = Path(args.out) if args.out else default_out(ckpt, args.split)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the evaluation tables and plots.")
    checkpoint = read_checkpoint(ckpt)
    spec = spec_for(checkpoint, str(ckpt))
    dm, model = spec.load(checkpoint, args.csv_path)  # refuses data other than the training data
    apply_sampling_arguments(model, args)
    model.to(model_device(args.device))
    if len(dm.tensors[args.split][0]) == 0:
        raise UserError(f"the {args.split} split of this run is empty; choose another --split.")
    spec.evaluate(model, dm, out, split=args.split)
    return 0


if __name__ == "__main__":
    sys.exit(main())

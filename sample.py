"""Generate designs from any subset of conditions:
`python sample.py --ckpt PATH --condition BikeStyle=ROAD --n 16 --out bikes.csv --plot bikes.png`.

Conditions not given are masked (none given = unconditional). The CSV has the data set's original column names.
"""
import argparse
import sys
from pathlib import Path

from modules.errors import UserError, cli_entry
from modules.sampling_cli import add_device_argument, add_sampling_arguments

PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint (.ckpt) of a trained model")
    p.add_argument("--condition", action="append", default=[], metavar="NAME=VALUE",
                   help="a known condition (repeatable); quote names with spaces: --condition 'Fork type=1'")
    p.add_argument("--n", type=int, default=8, help="number of designs (default 8)")
    p.add_argument("--out", required=True, help="CSV file for generated designs; PNG grid for generated images")
    p.add_argument("--singles", help="image models: also write each image as <folder>/<i>.png")
    p.add_argument("--plot", help="PNG file with the designs drawn in a grid")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_device_argument(p)
    add_sampling_arguments(p)
    return p.parse_args(argv)


def parse_conditions(pairs: list[str], names: list[str]) -> dict:
    """NAME=VALUE strings → {name: value}; names may contain spaces, colons and '=' signs of their own."""
    conditions = {}
    for pair in pairs:
        match = next((n for n in sorted(names, key=len, reverse=True) if pair.startswith(n + "=")), None)
        if match is None:
            name = pair.split("=", 1)[0]
            if "=" not in pair:
                raise UserError(f"--condition {pair!r} must have the form NAME=VALUE. Valid names: {', '.join(names)}.")
            raise UserError(f"--condition: unknown condition '{name}'. Valid conditions: {', '.join(names)}.")
        value = pair[len(match) + 1:]
        if value.strip() == "":
            raise UserError(f"--condition '{match}=' has no value; give one, or leave the condition out to mask it.")
        if match in conditions:
            raise UserError(f"--condition '{match}' is given twice.")
        conditions[match] = value
    return conditions


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be ≥ 1, got {args.n}.")
    if args.plot and Path(args.plot).suffix.lower() not in PLOT_FORMATS:
        raise UserError(f"--plot {args.plot}: give a file ending in {', '.join(PLOT_FORMATS)}.")
    from modules.base import ImageSampling
    from modules.sampling_cli import apply_sampling_arguments, model_device
    from modules.registry import spec_for
    from modules.training import read_checkpoint

    checkpoint = read_checkpoint(args.ckpt)
    _, model = spec_for(checkpoint, args.ckpt).load(checkpoint, with_data=False)
    apply_sampling_arguments(model, args)
    model.to(model_device(args.device))
    conditions = parse_conditions(args.condition, model.schema.names)
    asked = ", ".join(f"{k}={v}" for k, v in conditions.items()) or "no conditions (unconditional)"
    if isinstance(model, ImageSampling):
        return _sample_images(model, conditions, args, asked)
    designs = model.sample(conditions, n=args.n, seed=args.seed)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        designs.to_csv(out, index=False)
    except OSError as err:
        raise UserError(f"--out {out} cannot be written ({err.strerror}); choose another path.") from None
    print(f"{args.n} designs for {asked} → {out}")
    if args.plot:
        from modules.plotting import design_grid

        data_cfg = model.cfg.data
        style = data_cfg.plot_style if data_cfg.plot_style != "none" else "points"
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        path = design_grid(designs, Path(args.plot), style=style,
                           outline_points=data_cfg.outline_points, titles=[f"#{i}" for i in range(args.n)],
                           suptitle=asked)
        print(f"drawing → {path}")
    return 0


def _sample_images(model, conditions: dict, args, asked: str) -> int:
    from PIL import Image

    from modules.image_evaluation import image_grid

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: an image model writes a PNG grid; give a file ending in .png.")
    images = model.sample(conditions, n=args.n, seed=args.seed)
    per_row = 8
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = [images[i:i + per_row] for i in range(0, len(images), per_row)]
        image_grid(rows, out, labels=[f"{asked}: samples {i + 1}-{i + len(r)} of {len(images)}, seed {args.seed}"
                                      for i, r in zip(range(0, len(images), per_row), rows)])
        if args.singles:
            folder = Path(args.singles)
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images.cpu().numpy()):
                Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(folder / f"{i}.png")
    except OSError as err:
        raise UserError(f"cannot write {err.filename} ({err.strerror}); choose another path.") from None
    print(f"{args.n} images for {asked} → {out}" + (f" and {args.singles}/<i>.png" if args.singles else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

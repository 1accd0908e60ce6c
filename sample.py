"""Generate designs from any subset of conditions:
`python sample.py --ckpt PATH --condition BikeStyle=ROAD --n 16 --out bikes.csv --plot bikes.png`.

Conditions not given are masked (none given = unconditional). The CSV has the data set's original column names.
"""
import argparse
import sys
import warnings
from pathlib import Path

from modules.conditioning import OutOfRangeCondition
from modules.errors import UserError, cli_entry
from modules.sampling_cli import add_device_argument, add_sampling_arguments

PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint (.ckpt) of a trained model")
    p.add_argument("--condition", action="append", default=[], metavar="NAME=VALUE",
                   help="a known condition (repeatable); quote names with spaces: --condition 'Fork type=1'")
    p.add_argument("--conditions_csv", metavar="FILE",
                   help="one request per row (columns: condition names; an empty cell is masked); --n designs per row")
    p.add_argument("--n", type=int, default=8, help="number of designs (per request row with --conditions_csv; default 8)")
    p.add_argument("--strict", action="store_true",
                   help="refuse numerical conditions outside the training range (default: a warning)")
    p.add_argument("--out", required=True, help="CSV file for generated designs; PNG grid for generated images")
    p.add_argument("--singles", help="image models: also write each image as <folder>/<i>.png")
    p.add_argument("--plot", help="PNG file with the designs drawn in a grid")
    p.add_argument("--plot_style", choices=["auto", "bike", "profile", "points", "columns"],
                   help="how --plot draws the designs (default: the run's data.plot_style)")
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


def read_conditions_csv(path: Path, schema) -> "pd.DataFrame":
    """The request rows of --conditions_csv: every column a condition, every filled cell a valid value (checked
    here, so an error names the file, the row and the column); empty cells are masked."""
    import pandas as pd

    if not path.is_file():
        raise UserError(f"--conditions_csv {path} does not exist.")
    try:
        frame = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise UserError(f"--conditions_csv {path} cannot be read as CSV ({str(err).splitlines()[0]}).") from None
    unknown = [c for c in frame.columns if c not in schema.names]
    if unknown:
        raise UserError(f"--conditions_csv {path}: column '{unknown[0]}' is not a condition of this model. Valid "
                        f"conditions: {', '.join(schema.names)} (leave a condition out, or its cell empty, to mask it).")
    if frame.empty:
        raise UserError(f"--conditions_csv {path} has no rows; give one request per row below the header.")
    for i, row in frame.iterrows():
        for name, value in row.items():
            if isinstance(value, str) and value.strip():
                schema.parse_value(name, value, source=f"--conditions_csv {path}, row {i + 1}")
    return frame.astype(object).where(frame.notna(), None)  # empty cells: None (a string column keeps NaN)


def check_outputs(args, spec) -> None:
    """What can be checked before the model is loaded (an mcLDM takes seconds): the kind of --out, --plot."""
    out = Path(args.out)
    if spec.generates == "images":
        if out.suffix.lower() != ".png":
            raise UserError(f"--out {out}: an image model writes a PNG grid; give a file ending in .png.")
        if args.plot:
            raise UserError(f"--plot {args.plot}: an image model draws its grid into --out {out}; leave --plot out.")
    elif out.suffix.lower() != ".csv":
        raise UserError(f"--out {out}: a parametric model writes the designs as CSV; give a file ending in .csv "
                        "(and --plot FILE.png for a drawing).")
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name.")


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be ≥ 1, got {args.n}.")
    if args.plot and Path(args.plot).suffix.lower() not in PLOT_FORMATS:
        raise UserError(f"--plot {args.plot}: give a file ending in {', '.join(PLOT_FORMATS)}.")
    if args.condition and args.conditions_csv:
        raise UserError("give the conditions either with --condition or in --conditions_csv, not both.")
    from modules.base import ImageSampling
    from modules.image_evaluation import prompt_label
    from modules.registry import spec_for
    from modules.sampling_cli import apply_sampling_arguments, model_device
    from modules.training import read_checkpoint

    checkpoint = read_checkpoint(args.ckpt)
    spec = spec_for(checkpoint, args.ckpt)
    check_outputs(args, spec)
    _, model = spec.load(checkpoint, with_data=False)
    style = None
    if args.plot:  # a drawing that cannot be made fails here, before anything is generated or written
        from modules.plotting import resolve_plot_style

        style = resolve_plot_style(args.plot_style or model.cfg.data.plot_style, list(model.cfg.data.design_columns))
    apply_sampling_arguments(model, args)
    model.to(model_device(args.device))
    if args.conditions_csv:
        requests = read_conditions_csv(Path(args.conditions_csv), model.schema)
        asked = f"{len(requests)} requests of {args.conditions_csv}"
    else:
        requests = parse_conditions(args.condition, model.schema.names)
        asked = prompt_label(requests)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OutOfRangeCondition)
        if isinstance(model, ImageSampling):
            return _sample_images(model, requests, args, asked, caught)
        designs = model.sample(requests, n=args.n, seed=args.seed)
    _report_range(caught, args)
    if args.conditions_csv:  # which request each design answers (1 = the first row below the header)
        designs.insert(0, "request", [1 + i // args.n for i in range(len(designs))])
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        designs.to_csv(out, index=False)
    except OSError as err:
        raise UserError(f"--out {out} cannot be written ({err.strerror}); choose another path.") from None
    print(f"{len(designs)} designs for {asked} → {out}")
    if args.plot:
        _plot_designs(model, designs, args, asked, style, requests)
    return 0


def _report_range(caught, args) -> None:
    """Out-of-range numerical conditions: a warning, or with --strict an error (raised before anything is written)."""
    messages = [str(w.message) for w in caught if issubclass(w.category, OutOfRangeCondition)]
    for message in dict.fromkeys(messages):
        if args.strict:
            raise UserError(f"{message.split('. The model')[0]}; --strict refuses it. Ask within the training range, "
                            "or leave --strict out to extrapolate.")
        print(f"warning: {message}", file=sys.stderr)


def _plot_designs(model, designs, args, asked: str, style: str, requests) -> None:
    import pandas as pd

    from modules.plotting import design_grid, real_designs_like

    data_cfg = model.cfg.data
    real = None
    csv = Path(data_cfg.csv_path)
    if style == "columns" and not args.conditions_csv and csv.is_file():  # real designs sharing the conditions
        real = real_designs_like(pd.read_csv(csv), requests, model.schema)
    if "request" in designs:
        titles = [f"request {r} #{i % args.n}" for i, r in enumerate(designs["request"])]
    else:
        titles = [f"#{i}" for i in range(len(designs))]
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    path = design_grid(designs.drop(columns=["request"], errors="ignore"), Path(args.plot), style=style,
                       design_columns=data_cfg.design_columns, outline_points=data_cfg.outline_points,
                       titles=titles, suptitle=asked, real=real)
    print(f"drawing → {path}")


def _sample_images(model, requests, args, asked: str, caught) -> int:
    from PIL import Image

    from modules.image_evaluation import image_grid, prompt_label

    out = Path(args.out)
    images = model.sample(requests, n=args.n, seed=args.seed)
    _report_range(caught, args)
    if args.conditions_csv:  # a row per request, labelled with what it asked for
        rows = [images[i * args.n:(i + 1) * args.n] for i in range(len(requests))]
        labels = [f"request {i + 1}: {prompt_label({k: v for k, v in r.items() if v is not None})} ({args.n} samples, "
                  f"seed {args.seed})" for i, r in enumerate(requests.to_dict("records"))]
    else:
        per_row = 8
        rows = [images[i:i + per_row] for i in range(0, len(images), per_row)]
        labels = [f"{asked}: samples {i + 1}-{i + len(r)} of {len(images)}, seed {args.seed}"
                  for i, r in zip(range(0, len(images), per_row), rows)]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(rows, out, labels=labels)
        if args.singles:
            folder = Path(args.singles)
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images.cpu().numpy()):
                Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(folder / f"{i}.png")
    except OSError as err:
        raise UserError(f"cannot write {err.filename} ({err.strerror}); choose another path.") from None
    print(f"{len(images)} images for {asked} → {out}" + (f" and {args.singles}/<i>.png" if args.singles else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

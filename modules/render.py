"""Bike sketches rendered from BIKED parametric designs: a real image data set whose pictures show the conditions.

    python -m modules.render --csv data/biked/df_parameters_final.csv --out data/biked_sketches --size 256

One fixed scale and origin for every bike (millimetres → pixels), so geometry is comparable across images.
Drawn in grayscale at `supersample`× the size and downsampled, so thin tubes stay visible at 64 px.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image, ImageDraw

# The window every bike is drawn in, in BIKED millimetres (x right, y up). It holds 99.5 % of the BIKED designs
# with their wheels; parts of the rare outliers beyond it are cut off.
WINDOW_X = (-100.0, 2200.0)
WINDOW_Y = (-550.0, 1750.0)
CHAIN_PITCH_MM = 12.7  # a chainring of N teeth has the pitch radius N·12.7 / (2π)

TUBES = [  # (from, to): BIKED reference points joined by a tube
    ("BB", "seat_tube_top"),  # seat tube
    ("top_tube_connect_seat_tube", "top_tube_connect_head_tube"),  # top tube
    ("BB", "down_tube_connect_head_tube"),  # down tube
    ("down_tube_connect_head_tube", "head_tube_top"),  # head tube
    ("rear_wheel_center", "BB"),  # chain stay
    ("rear_wheel_center", "rear_tube_connect_seat_tube"),  # seat stay
    ("head_tube_top", "stem_top"),  # stem
    ("seat_tube_top", "saddle_top"),  # seat post
]
DRAWN_POINTS = ("rear_wheel_center", "BB", "front_wheel_center", "head_tube_top", "rear_tube_connect_seat_tube",
                "top_tube_connect_seat_tube", "top_tube_connect_head_tube", "down_tube_connect_head_tube", "stem_top",
                "front_fork", "saddle_top", "seat_tube_top")
# the BIKED design columns `render_bike` reads (x_NAME, y_NAME of every drawn point and both wheel diameters)
DESIGN_COLUMNS = tuple(f"{axis}_{point}" for point in DRAWN_POINTS for axis in "xy") + (
    "Wheel diameter rear", "Wheel diameter front")
CONDITION_NAMES = {  # BIKED condition columns the renderer reads
    "rim_front": "RIM_STYLE front",
    "rim_rear": "RIM_STYLE rear",
    "bottle_seat": "bottle SEATTUBE0 show OHCLASS: True",
    "bottle_down": "bottle DOWNTUBE0 show OHCLASS: True",
    "teeth": "Teeth on chainring",
    "fork": "Fork type",
}


class _Canvas:
    """Millimetre → pixel mapping and drawing helpers on a supersampled grayscale image."""

    def __init__(self, size: int, supersample: int):
        self.px = size * supersample
        self.scale = self.px / (WINDOW_X[1] - WINDOW_X[0])  # pixels per millimetre (square window)
        self.image = Image.new("L", (self.px, self.px), 255)
        self.draw = ImageDraw.Draw(self.image)

    def xy(self, point: tuple[float, float]) -> tuple[float, float]:
        x, y = point
        return (x - WINDOW_X[0]) * self.scale, (WINDOW_Y[1] - y) * self.scale

    def width(self, mm: float) -> int:
        return max(1, int(round(mm * self.scale)))

    def line(self, a, b, mm: float, fill: int = 0) -> None:
        if not all(math.isfinite(v) for v in (*a, *b)):
            return
        self.draw.line([self.xy(a), self.xy(b)], fill=fill, width=self.width(mm))
        r = self.width(mm) / 2  # round caps, so joints look closed
        for p in (a, b):
            x, y = self.xy(p)
            self.draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    def circle(self, center, radius_mm: float, *, outline_mm: float = 0.0, fill: Optional[int] = None) -> None:
        x, y = self.xy(center)
        r = radius_mm * self.scale
        if not (r > 0 and math.isfinite(r) and math.isfinite(x) and math.isfinite(y)):
            return  # a generated design may carry a negative or undefined diameter
        box = [x - r, y - r, x + r, y + r]
        if fill is not None:
            self.draw.ellipse(box, fill=fill)
        if outline_mm:
            self.draw.ellipse(box, outline=0, width=self.width(outline_mm))

    def polygon(self, points, fill: int = 0) -> None:
        if not all(math.isfinite(v) for p in points for v in p):
            return
        self.draw.polygon([self.xy(p) for p in points], fill=fill)


def _point(design: Mapping[str, float], name: str) -> tuple[float, float]:
    return float(design[f"x_{name}"]), float(design[f"y_{name}"])


def _condition(conditions: Mapping[str, Any], key: str, default):
    value = conditions.get(CONDITION_NAMES[key], default)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return value


def _flag(value) -> bool:
    return str(value).strip().lower() in ("1", "1.0", "true", "yes")


def _wheel(c: _Canvas, center, diameter: float, style: str) -> None:
    """Tyre and rim; the rim style decides the inside: spokes, three blades, or a filled disc."""
    r = diameter / 2
    rim = r * 0.86
    c.circle(center, r, outline_mm=22)
    c.circle(center, rim, outline_mm=8)
    if style == "disc":
        c.circle(center, rim, fill=110)
    elif style == "trispoke":
        for k in range(3):
            angle = math.pi / 2 + k * 2 * math.pi / 3
            tip = (center[0] + rim * math.cos(angle), center[1] + rim * math.sin(angle))
            normal = (-math.sin(angle) * 38, math.cos(angle) * 38)
            c.polygon([(center[0] + normal[0] * 1.4, center[1] + normal[1] * 1.4),
                       (tip[0] + normal[0] * 0.6, tip[1] + normal[1] * 0.6),
                       (tip[0] - normal[0] * 0.6, tip[1] - normal[1] * 0.6),
                       (center[0] - normal[0] * 1.4, center[1] - normal[1] * 1.4)])
    else:  # spoked
        for k in range(16):
            angle = k * 2 * math.pi / 16
            c.line(center, (center[0] + rim * math.cos(angle), center[1] + rim * math.sin(angle)), 3, fill=60)
    c.circle(center, 30, fill=0)  # hub


def _bottle(c: _Canvas, a, b) -> None:
    """A bottle lying on the tube a→b, centred on it, on the side away from the wheels' top (up/left)."""
    length = math.dist(a, b)
    if length < 1:
        return
    ux, uy = (b[0] - a[0]) / length, (b[1] - a[1]) / length
    nx, ny = -uy, ux  # normal
    if ny < 0 or (ny == 0 and nx < 0):
        nx, ny = -nx, -ny
    mid = (a[0] + ux * length * 0.5 + nx * 55, a[1] + uy * length * 0.5 + ny * 55)
    half = 110
    c.line((mid[0] - ux * half, mid[1] - uy * half), (mid[0] + ux * half, mid[1] + uy * half), 72)


def _fork(c: _Canvas, crown, dropout, fork_type: str) -> None:
    """0: rigid (one thin blade); 1: suspension (thick stanchion, thin lower leg); 2: aero (wide tapered blade)."""
    if fork_type == "1":
        knee = (crown[0] + (dropout[0] - crown[0]) * 0.55, crown[1] + (dropout[1] - crown[1]) * 0.55)
        c.line(crown, knee, 62)
        c.line(knee, dropout, 24)
    elif fork_type == "2":
        length = math.dist(crown, dropout) or 1.0
        nx, ny = -(dropout[1] - crown[1]) / length, (dropout[0] - crown[0]) / length
        c.polygon([(crown[0] + nx * 45, crown[1] + ny * 45), (dropout[0] + nx * 12, dropout[1] + ny * 12),
                   (dropout[0] - nx * 12, dropout[1] - ny * 12), (crown[0] - nx * 45, crown[1] - ny * 45)])
    else:
        c.line(crown, dropout, 20)


def render_bike(design: Mapping[str, float], conditions: Optional[Mapping[str, Any]] = None, *, size: int = 256,
                supersample: int = 2) -> np.ndarray:
    """A size×size uint8 grayscale sketch (white background) of one BIKED design and its conditions.

    `design` holds the 26 BIKED design columns; `conditions` any of the BIKED condition columns (absent ones:
    spoked rims, no bottles, no chainring, rigid fork). Deterministic: the same input gives the same pixels.
    """
    conditions = conditions or {}
    c = _Canvas(size, supersample)
    rear, front = _point(design, "rear_wheel_center"), _point(design, "front_wheel_center")
    _wheel(c, rear, float(design["Wheel diameter rear"]), str(_condition(conditions, "rim_rear", "spoked")))
    _wheel(c, front, float(design["Wheel diameter front"]), str(_condition(conditions, "rim_front", "spoked")))
    teeth = float(_condition(conditions, "teeth", 0) or 0)
    bb = _point(design, "BB")
    if teeth > 0:
        c.circle(bb, teeth * CHAIN_PITCH_MM / (2 * math.pi), outline_mm=14)
    for a, b in TUBES:
        c.line(_point(design, a), _point(design, b), 28)
    saddle = _point(design, "saddle_top")
    c.line((saddle[0] - 120, saddle[1]), (saddle[0] + 130, saddle[1]), 40)
    stem = _point(design, "stem_top")
    c.line(stem, (stem[0] + 90, stem[1] - 20), 26)  # handlebar stub
    crown = _point(design, "down_tube_connect_head_tube")
    _fork(c, crown, _point(design, "front_fork"), canonical(_condition(conditions, "fork", "0")))
    c.line(_point(design, "front_fork"), front, 20)
    if _flag(_condition(conditions, "bottle_seat", 0)):
        _bottle(c, bb, _point(design, "seat_tube_top"))
    if _flag(_condition(conditions, "bottle_down", 0)):
        _bottle(c, bb, _point(design, "down_tube_connect_head_tube"))
    image = c.image if supersample == 1 else c.image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def canonical(value) -> str:
    from modules.conditioning import canonical_category

    return canonical_category(value) or "0"


# --------------------------------------------------------------------------- data set


def _render_rows(job: tuple[list[dict], list[dict], list[str], int, str]) -> int:
    designs, conditions, names, size, out_dir = job
    for design, cond, name in zip(designs, conditions, names):
        Image.fromarray(render_bike(design, cond, size=size)).save(Path(out_dir) / f"{name}.png", optimize=False,
                                                                  compress_level=1)
    return len(names)


def render_dataset(csv: Path, out_dir: Path, *, size: int = 256, workers: int = 1, id_column: str = "Bike index",
                   limit: Optional[int] = None, progress: bool = True) -> Path:
    """Render every row of a BIKED CSV to <out>/<id>.png and write <out>/conditions.csv; returns that CSV."""
    import pandas as pd
    from tqdm import tqdm

    from modules.errors import UserError

    csv, out_dir = Path(csv), Path(out_dir)
    if not csv.is_file():
        raise UserError(f"--csv {csv} does not exist; the BIKED table is data/biked/df_parameters_final.csv.")
    frame = pd.read_csv(csv)
    needed = [f"{a}_{p}" for p in ("rear_wheel_center", "front_wheel_center", "BB", "seat_tube_top", "saddle_top",
                                   "stem_top", "head_tube_top", "front_fork", "down_tube_connect_head_tube")
              for a in "xy"] + ["Wheel diameter rear", "Wheel diameter front", id_column]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise UserError(f"{csv}: the renderer needs the BIKED columns {', '.join(missing[:4])}, which are missing.")
    if frame[id_column].duplicated().any():
        raise UserError(f"{csv}: '{id_column}' has duplicate ids ({frame[id_column][frame[id_column].duplicated()].iloc[0]}); "
                        "image names must be unique.")
    if limit:
        frame = frame.head(limit)
    out_dir.mkdir(parents=True, exist_ok=True)
    design_cols = [c for c in frame.columns if c.startswith(("x_", "y_")) or c.startswith("Wheel diameter")]
    cond_cols = [c for c in CONDITION_NAMES.values() if c in frame.columns]
    designs = frame[design_cols].to_dict(orient="records")
    conditions = frame[cond_cols].to_dict(orient="records")
    names = [str(i) for i in frame[id_column].tolist()]
    chunk = 64
    jobs = [(designs[i:i + chunk], conditions[i:i + chunk], names[i:i + chunk], size, str(out_dir))
            for i in range(0, len(names), chunk)]
    bar = tqdm(total=len(names), desc=f"rendering {size} px", unit="bike", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for done in pool.map(_render_rows, jobs):
                bar.update(done)
    else:
        for job in jobs:
            bar.update(_render_rows(job))
    bar.close()
    table = frame[[id_column] + [c for c in frame.columns if c not in design_cols and c != id_column
                                 and not c.startswith("Unnamed")]]
    table.insert(1, "image", [f"{n}.png" for n in names])
    path = out_dir / "conditions.csv"
    table.to_csv(path, index=False)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Render BIKED parametric designs as grayscale bike sketches.")
    p.add_argument("--csv", required=True, help="BIKED table (data/biked/df_parameters_final.csv)")
    p.add_argument("--out", required=True, help="folder for <Bike index>.png and conditions.csv")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (square; default 256)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    p.add_argument("--limit", type=int, help="render only the first N bikes")
    args = p.parse_args(argv)
    from modules.errors import UserError

    if not 16 <= args.size <= 2048:
        raise UserError(f"--size must lie in [16, 2048], got {args.size}.")
    path = render_dataset(Path(args.csv), Path(args.out), size=args.size, workers=max(1, args.workers),
                          limit=args.limit)
    print(f"written: {path.parent}/<Bike index>.png and {path}")
    return 0


if __name__ == "__main__":
    from modules.errors import cli_entry

    sys.exit(cli_entry(main)())

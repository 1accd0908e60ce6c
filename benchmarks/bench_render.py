"""Benchmark: render every BIKED design as a sketch (issue #3 goal: all 4,355 at 256 px in < 60 s on 2 cores).

    python benchmarks/bench_render.py [--size 256] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modules.render import render_dataset  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default=str(ROOT / "data" / "biked" / "df_parameters_final.csv"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        table = render_dataset(Path(args.csv), Path(out), size=args.size, workers=args.workers, progress=False)
        seconds = time.perf_counter() - started
        n = sum(1 for _ in Path(out).glob("*.png"))
        megabytes = sum(f.stat().st_size for f in Path(out).glob("*.png")) / 2**20
    print(f"rendered {n} bikes at {args.size} px with {args.workers} workers in {seconds:.1f} s "
          f"({n / seconds:.0f} bikes/s, {megabytes:.1f} MB of PNG); conditions table: {table.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

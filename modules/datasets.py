"""Fetch, verify and prepare the data sets: BIKED and the car profiles of the authors' repository.

    python -m modules.datasets fetch [biked] [cars] [--dir data] [--from URL_OR_DIR]

Every file is pinned by size and SHA-256 at one commit of `Phillip-M97/Masked_Conditioning`, so a run on a fresh
machine trains on the same bytes as the authors and this project's CI. Sources, in order: `--from` when given
(a base URL standing in for the raw GitHub one, or a folder holding the authors' `data/` tree); otherwise the
workspace copy in `../shared/data` when there is one (no network), then GitHub over HTTPS. A file is written to
a temporary file in its target folder and renamed only once its size and hash match, so a failed or interrupted
fetch keeps the old file and leaves no partial one. `data/cars/cars.csv`, the table the car configs read, is
decoded here from the authors' integer-coded profiles (`decode_car_profiles`).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from modules.errors import UserError

REPOSITORY = "Phillip-M97/Masked_Conditioning"
COMMIT = "2f5d980a15be523b8fe546c3eb16cd249e733cf1"
GITHUB_RAW = f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}"
ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"  # this project's workspace and CI hold the data sets here
CHUNK = 1 << 16
TIMEOUT_S = 60.0  # per blocking socket operation: a stalled server fails instead of hanging the set-up


@dataclass(frozen=True)
class PinnedFile:
    """One file of the authors' repository: where it lies there, where it goes here, and its exact bytes."""
    dataset: str  # the folder under --dir (biked, cars), as in ../shared/data
    name: str  # the file name there
    authors_path: str  # its path in the authors' repository
    size: int
    sha256: str

    def target(self, data_dir: Path) -> Path:
        return data_dir / self.dataset / self.name


PINNED = (
    PinnedFile("biked", "df_parameters_final.csv", "data/bike_data/df_parameters_final.csv", 2_004_908,
               "61a6b97d3179e481d30bc9bb8647bad848fd9fd25ff5791d132a0f55274d2a9b"),
    PinnedFile("cars", "processed_for_emb.csv", "data/car_data/processed_for_emb.csv", 330_291,
               "0ee8c13372ee83da49c0a909fa61929e62da883486603214bfda98b277e0fa7f"),
    PinnedFile("cars", "mappings_emb.json", "data/car_data/mappings_emb.json", 2_406,
               "b813462bea83aed6f34ec6e061630e492f4a212eb0114332efb8d524e1942315"),
)
DATASETS = ("biked", "cars")
CARS_TABLE = "cars.csv"
BUZZWORD_SLOTS = 3  # the table's buzzword1..3


# --------------------------------------------------------------------------- the car table


def decode_car_profiles(processed_csv: Path, mappings_json: Path) -> bytes:
    """The one-row-per-car table (`cars.csv`) from the authors' integer-coded profiles and their code mappings.

    Columns keep the order of `processed_for_emb.csv`, with `buzzwords` replaced in place by `buzzword1..3`.
    Numbers are copied as written (no float round trip), and the coded columns get the names `mappings_emb.json`
    gives their codes. A car's buzzwords are listed `i;j;k` (ascending codes, some cars have more than three):
    the table keeps the first three, and a car with only two leaves `buzzword3` empty (a missing condition).
    Lines end in CRLF like the table the configs were written against, so the output equals it byte for byte.
    """
    try:
        mappings = json.loads(mappings_json.read_text(encoding="utf-8"))
        text = processed_csv.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read the car profiles ({processed_csv}, {mappings_json}): {err}. "
                        "Fetch them again with `python -m modules.datasets fetch cars`.") from err
    names_of = {column: {code: name for name, code in codes.items()} for column, codes in mappings.items()}
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows)
    if "buzzwords" not in header or "buzzwords" not in names_of:
        raise UserError(f"{processed_csv} has no `buzzwords` column (or {mappings_json} no `buzzwords` mapping): "
                        "these are not the authors' car profiles; fetch them again with "
                        "`python -m modules.datasets fetch cars`.")
    buzzwords_at = header.index("buzzwords")
    coded = {i: names_of[column] for i, column in enumerate(header) if column in names_of and column != "buzzwords"}

    def name(column_at: int, code: str, line: int, table: dict[int, str]) -> str:
        try:
            return table[int(code)]
        except (ValueError, KeyError):
            raise UserError(f"{processed_csv}, line {line}, column `{header[column_at]}`: code {code!r} is not in "
                            f"{mappings_json}. Fetch both files again with `python -m modules.datasets fetch cars`.")

    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header[:buzzwords_at] + [f"buzzword{k}" for k in range(1, BUZZWORD_SLOTS + 1)]
                    + header[buzzwords_at + 1:])
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise UserError(f"{processed_csv}, line {line}: {len(row)} cells where the header has {len(header)}. "
                            "Fetch the file again with `python -m modules.datasets fetch cars`.")
        cells = [name(i, cell, line, coded[i]) if i in coded else cell for i, cell in enumerate(row)]
        words = [name(buzzwords_at, code, line, names_of["buzzwords"])
                 for code in row[buzzwords_at].split(";")[:BUZZWORD_SLOTS] if code != ""]
        words += [""] * (BUZZWORD_SLOTS - len(words))
        writer.writerow(cells[:buzzwords_at] + words + cells[buzzwords_at + 1:])
    return out.getvalue().encode("utf-8")


# --------------------------------------------------------------------------- verified, atomic writes


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_pinned_copy(path: Path, pinned: PinnedFile) -> bool:
    return path.is_file() and path.stat().st_size == pinned.size and sha256_of(path) == pinned.sha256


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(target: Path, chunks: Iterator[bytes], check=None) -> None:
    """Stream `chunks` into a temporary file beside `target` and rename it over `target` only if `check(size,
    sha256)` passes (it raises otherwise). Any failure, Ctrl+C included, removes the temporary file: the old
    target stays as it was and no partial file is left."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".part",
                                             delete=False)
    except OSError as err:
        raise UserError(f"cannot write into {target.parent}: {err}. Pass a writable folder with --dir.") from err
    temporary = Path(handle.name)
    try:
        digest, size = hashlib.sha256(), 0
        with handle:
            for chunk in chunks:
                handle.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it owner-only; give it a normal file's mode
        if check is not None:
            check(size, digest.hexdigest())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _pinned_check(pinned: PinnedFile, source: str, target: Path):
    def check(size: int, sha256: str) -> None:
        if size != pinned.size or sha256 != pinned.sha256:
            kept = "the old file is kept" if target.exists() else "nothing was written"
            raise UserError(
                f"{source} does not match the pinned {pinned.authors_path} of {REPOSITORY} at commit {COMMIT}: "
                f"it has {size:,} bytes and SHA-256 {sha256}, expected {pinned.size:,} bytes and {pinned.sha256}; "
                f"{target} was not replaced ({kept}). Check that the source holds the authors' files at that "
                "commit, or place the right file there by hand.")
    return check


def _offline_advice(data_dir: Path) -> str:
    by_hand = ", ".join(f"{p.authors_path} → {p.target(data_dir)}" for p in PINNED)
    return ("Without network, fetch from a folder that holds the authors' data/ tree (a clone of "
            f"https://github.com/{REPOSITORY} at commit {COMMIT}): `python -m modules.datasets fetch --from DIR`; "
            f"or place the files by hand ({by_hand}) and run the fetch again to verify them and build "
            f"{data_dir / 'cars' / CARS_TABLE}.")


def _download(url: str, total_expected: int, timeout: float, data_dir: Path) -> Iterator[bytes]:
    from tqdm import tqdm

    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise UserError(f"downloading {url} failed: HTTP {err.code} {err.reason}. {_offline_advice(data_dir)}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"downloading {url} failed: {reason}. {_offline_advice(data_dir)}") from err
    with response:
        announced = response.headers.get("Content-Length")
        total = int(announced) if announced and announced.isdigit() else total_expected
        received = 0
        # disable=None: a bar on a terminal, nothing in CI logs
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=None,
                  leave=False) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, ValueError) as err:  # a reset or a timeout mid-body
                    raise UserError(f"downloading {url} broke off after {received:,} of {total:,} bytes: {err}. "
                                    f"Nothing was written; run the fetch again. {_offline_advice(data_dir)}") from err
                if not chunk:
                    break
                received += len(chunk)
                bar.update(len(chunk))
                yield chunk
        # http.client ends a body cut short silently: compare with what the server announced
        if announced and received < total:
            raise UserError(f"downloading {url} broke off after {received:,} of {total:,} bytes. Nothing was "
                            f"written; run the fetch again. {_offline_advice(data_dir)}")


def _read_local(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        yield from iter(lambda: handle.read(CHUNK), b"")


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _fetch_file(pinned: PinnedFile, data_dir: Path, source: str | None, timeout: float) -> str:
    """Make `pinned.target(data_dir)` the pinned file; return what was done, for the log line."""
    target = pinned.target(data_dir)
    if is_pinned_copy(target, pinned):
        return "up to date"
    if source is None and is_pinned_copy(SHARED / pinned.dataset / pinned.name, pinned):
        local = SHARED / pinned.dataset / pinned.name
        write_atomically(target, _read_local(local), _pinned_check(pinned, str(local), target))
        return f"copied from {local}"
    if source is not None and not is_url(source):
        local = Path(source).expanduser() / pinned.authors_path
        if not local.is_file():
            raise UserError(f"--from {source}: {local} does not exist. --from takes a folder that holds the "
                            f"authors' data/ tree ({', '.join(p.authors_path for p in PINNED)}), e.g. a clone of "
                            f"https://github.com/{REPOSITORY} at commit {COMMIT}.")
        write_atomically(target, _read_local(local), _pinned_check(pinned, str(local), target))
        return f"copied from {local}"
    url = f"{(source or GITHUB_RAW).rstrip('/')}/{pinned.authors_path}"
    write_atomically(target, _download(url, pinned.size, timeout, data_dir), _pinned_check(pinned, url, target))
    return f"downloaded from {url}"


def build_cars_table(data_dir: Path) -> str:
    """Write `cars.csv` decoded from the two car files (rewritten only when it differs)."""
    folder = data_dir / "cars"
    table = decode_car_profiles(folder / "processed_for_emb.csv", folder / "mappings_emb.json")
    target = folder / CARS_TABLE
    if target.is_file() and target.read_bytes() == table:
        return "up to date"
    write_atomically(target, iter([table]))
    return f"decoded from processed_for_emb.csv + mappings_emb.json ({len(table.splitlines()) - 1} cars)"


def fetch(datasets: tuple[str, ...] = DATASETS, data_dir: Path = Path("data"), source: str | None = None,
          timeout: float = TIMEOUT_S, log=print) -> None:
    """Fetch and verify the pinned files of `datasets` into `data_dir`, then build the car table."""
    for pinned in PINNED:
        if pinned.dataset in datasets:
            log(f"{pinned.target(data_dir)}: {_fetch_file(pinned, data_dir, source, timeout)}")
    if "cars" in datasets:
        log(f"{data_dir / 'cars' / CARS_TABLE}: {build_cars_table(data_dir)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modules.datasets", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser(
        "fetch", help="fetch and verify the data sets, and build data/cars/cars.csv",
        description=f"Fetch the data sets pinned at {REPOSITORY}@{COMMIT[:7]}, verify their sizes and SHA-256, "
                    "and build data/cars/cars.csv.")
    fetch_parser.add_argument("datasets", nargs="*", metavar="DATASET",
                              help=f"any of {', '.join(DATASETS)} (default: both)")
    fetch_parser.add_argument("--dir", default="data", help="the data folder (default: data)")
    fetch_parser.add_argument("--from", dest="source", default=None, metavar="URL_OR_DIR",
                              help="a base URL standing in for the raw GitHub one at the pinned commit, or a folder "
                                   "holding the authors' data/ tree (offline); default: ../shared/data when it has "
                                   "the files, else GitHub")
    fetch_parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds a stalled download waits")
    args = parser.parse_args(argv)
    unknown = [name for name in args.datasets if name not in DATASETS]
    if unknown:  # checked here: argparse rejects an empty list against `choices` for nargs="*"
        raise UserError(f"unknown data set {', '.join(unknown)}: choose from {', '.join(DATASETS)}.")
    if args.source is not None and not is_url(args.source) and not Path(args.source).expanduser().is_dir():
        raise UserError(f"--from {args.source}: no such folder, and not an http(s) URL. Pass a base URL or a folder "
                        f"that holds the authors' data/ tree.")
    fetch(tuple(args.datasets) or DATASETS, Path(args.dir), args.source, args.timeout)
    return 0


if __name__ == "__main__":
    from modules.errors import cli_entry

    sys.exit(cli_entry(main)())

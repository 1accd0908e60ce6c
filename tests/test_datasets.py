"""`python -m modules.datasets fetch` and the set-up's data part, with no internet: a local HTTP server laid out like
the authors' repository stands in for raw GitHub. A good download verifies and decodes; a corrupted, interrupted
or unreachable one is refused with the URL named, the old file kept and no partial file left; the car decoder
reproduces the shared cars.csv byte for byte; and a clean clone sets itself up from the server and trains."""
from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from modules import datasets
from modules.datasets import PINNED, decode_car_profiles
from modules.errors import UserError, cli_entry
from tests.conftest import CARS, ROOT

DATA = ROOT / "data"  # the shared copy, linked by setup.sh (or fetched by it)
SOURCES = {p: DATA / p.dataset / p.name for p in PINNED}
pytestmark = pytest.mark.skipif(not all(path.is_file() for path in [CARS, *SOURCES.values()]),
                                reason="needs the data sets in data/ (bash setup.sh)")


def leftovers(folder: Path) -> list[str]:
    """Temporary files of an unfinished write."""
    return [p.name for p in folder.rglob(".*.part")] if folder.exists() else []


@pytest.fixture
def authors_tree(tmp_path) -> Path:
    """A folder holding the authors' data/ tree (data/bike_data/…, data/car_data/…) with the pinned bytes."""
    root = tmp_path / "authors"
    for pinned, source in SOURCES.items():
        (root / pinned.authors_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, root / pinned.authors_path)
    return root


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class HalfBodyHandler(QuietHandler):
    """Announces the whole file, sends half of it, then closes the connection (a download cut off)."""

    def do_GET(self):
        body = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


@contextlib.contextmanager
def serve(folder: Path, handler=QuietHandler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def fetch_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli_entry(datasets.main)(["fetch", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_fetched(data_dir: Path) -> None:
    for pinned, source in SOURCES.items():
        assert pinned.target(data_dir).read_bytes() == source.read_bytes(), pinned.name
    assert (data_dir / "cars" / "cars.csv").read_bytes() == CARS.read_bytes()
    assert not leftovers(data_dir)


def test_a_good_download_is_verified_and_the_car_table_decoded(tmp_path, authors_tree, capsys):
    with serve(authors_tree) as url:
        code, out, err = fetch_cli(capsys, "biked", "cars", "--dir", str(tmp_path / "data"), "--from", url)
    assert code == 0, err
    assert out.count(f"downloaded from {url}/data/") == 3 and "782 cars" in out
    assert_fetched(tmp_path / "data")
    # a second fetch finds everything in place and asks no server (this one is gone)
    code, out, err = fetch_cli(capsys, "--dir", str(tmp_path / "data"), "--from", url)
    assert code == 0, err
    assert out.count("up to date") == 4


def test_a_corrupted_download_is_refused_and_the_old_file_kept(tmp_path, authors_tree, capsys):
    served = authors_tree / "data/car_data/processed_for_emb.csv"
    good = served.read_bytes()
    served.write_bytes(good[:1000] + b"9" + good[1001:])  # one digit changed: same size, other hash
    old = tmp_path / "data" / "cars" / "processed_for_emb.csv"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"an earlier, partial copy\n")
    with serve(authors_tree) as url:
        code, _, err = fetch_cli(capsys, "cars", "--dir", str(tmp_path / "data"), "--from", url)
    assert code == 2
    assert f"{url}/data/car_data/processed_for_emb.csv does not match the pinned" in err
    assert "SHA-256" in err and "the old file is kept" in err
    assert old.read_bytes() == b"an earlier, partial copy\n"
    assert not (old.parent / "cars.csv").exists() and not leftovers(tmp_path / "data")


def test_an_interrupted_download_leaves_no_partial_file(tmp_path, authors_tree, capsys):
    with serve(authors_tree, HalfBodyHandler) as url:
        code, _, err = fetch_cli(capsys, "biked", "--dir", str(tmp_path / "data"), "--from", url)
    assert code == 2
    assert f"downloading {url}/data/bike_data/df_parameters_final.csv broke off after 1,002,454 of 2,004,908" in err
    assert not (tmp_path / "data" / "biked" / "df_parameters_final.csv").exists()
    assert not leftovers(tmp_path / "data")


def test_a_missing_server_names_the_url_and_how_to_work_offline(tmp_path, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    code, _, err = fetch_cli(capsys, "biked", "--dir", str(tmp_path / "data"), "--from", url, "--timeout", "5")
    assert code == 2
    assert f"downloading {url}/data/bike_data/df_parameters_final.csv failed" in err
    assert "--from DIR" in err and "place the files by hand" in err
    assert not leftovers(tmp_path / "data")


def test_the_car_decoder_reproduces_the_shared_table():
    folder = SOURCES[PINNED[1]].parent
    table = decode_car_profiles(folder / "processed_for_emb.csv", folder / "mappings_emb.json")
    assert table == CARS.read_bytes()  # byte for byte
    cars = pd.read_csv(CARS)
    assert list(cars.columns[-7:]) == ["manufacturer", "type", "class", "buzzword1", "buzzword2", "buzzword3",
                                       "drag_coeff"]
    assert len(cars) == 782 and cars["buzzword3"].isna().sum() == 5 and cars["buzzword2"].notna().all()


def test_an_unknown_code_is_an_error_naming_the_line(tmp_path):
    folder = SOURCES[PINNED[1]].parent
    lines = (folder / "processed_for_emb.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[3] = lines[3].replace(",0;1;13,", ",0;1;99,")
    bad = tmp_path / "processed_for_emb.csv"
    bad.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(UserError, match=r"line 4, column `buzzwords`: code '99'"):
        decode_car_profiles(bad, folder / "mappings_emb.json")


def test_from_dir_fetches_from_a_copy_of_the_authors_repository(tmp_path, authors_tree, capsys):
    code, out, err = fetch_cli(capsys, "--dir", str(tmp_path / "data"), "--from", str(authors_tree))
    assert code == 0, err
    assert out.count(f"copied from {authors_tree}/data/") == 3
    assert_fetched(tmp_path / "data")
    code, _, err = fetch_cli(capsys, "--dir", str(tmp_path / "other"), "--from", str(tmp_path / "data"))
    assert code == 2 and "does not exist" in err and "data/bike_data/df_parameters_final.csv" in err


def test_the_shared_copy_is_used_before_the_network(tmp_path, monkeypatch, capsys):
    shared = tmp_path / "shared" / "data"
    for pinned, source in SOURCES.items():
        (shared / pinned.dataset).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, shared / pinned.dataset / pinned.name)
    monkeypatch.setattr(datasets, "SHARED", shared)
    monkeypatch.setattr(datasets, "GITHUB_RAW", "http://127.0.0.1:9")  # were it asked, the fetch would fail
    code, out, err = fetch_cli(capsys, "--dir", str(tmp_path / "data"))
    assert code == 0, err
    assert out.count(f"copied from {shared}") == 3
    assert_fetched(tmp_path / "data")


def clean_clone(tmp_path: Path) -> Path:
    """The repository's files (tracked and new, not ignored) in a folder with no ../shared/data beside it."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    clone = tmp_path / "clone"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    return clone


def setup_env(source: str) -> dict:
    return {**os.environ, "SETUP_SKIP_PIP": "1", "MCVAE_DATA_URL": source, "WANDB_MODE": "disabled"}


def test_setup_on_a_clean_clone_fetches_the_data_and_trains_the_cars(tmp_path, authors_tree):
    clone = clean_clone(tmp_path)
    assert not (clone.parent / "shared").exists() and not (clone / "data").exists()
    with serve(authors_tree) as url:
        setup = subprocess.run(["bash", "setup.sh"], cwd=clone, env=setup_env(url), capture_output=True, text=True,
                               timeout=60)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "fetching biked cars into data/" in setup.stdout and "set-up done" in setup.stdout
    assert_fetched(clone / "data")
    train = subprocess.run([sys.executable, "train_mcvae.py", "--cfg_name", "mcvae_cars", "--max_epochs", "1",
                            "--no_eval"], cwd=clone, env=setup_env(url), capture_output=True, text=True, timeout=120)
    assert train.returncode == 0, train.stderr[-3000:]
    assert list((clone / "logs").glob("mcvae_cars_*/checkpoints/last.ckpt"))


def test_setup_links_the_shared_copy_and_touches_no_network(tmp_path, authors_tree):
    clone = clean_clone(tmp_path)
    shared = tmp_path / "shared" / "data"
    for pinned, source in SOURCES.items():
        (shared / pinned.dataset).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, shared / pinned.dataset / pinned.name)
    shutil.copyfile(CARS, shared / "cars" / "cars.csv")
    # a server that cuts every download short: the set-up must not ask it
    with serve(authors_tree, HalfBodyHandler) as url:
        setup = subprocess.run(["bash", "setup.sh"], cwd=clone, env=setup_env(url), capture_output=True, text=True,
                               timeout=60)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "linked data/biked" in setup.stdout and "linked data/cars" in setup.stdout
    assert "fetching" not in setup.stdout
    assert (clone / "data" / "cars").resolve() == (shared / "cars").resolve()

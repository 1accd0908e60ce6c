"""The evaluation's model-free fits cached on disk, keyed by a fingerprint of everything they are fitted on: the
adherence forests and the conditional forest's predictions are the same for every run of a split (a sweep, the
seeds of a table), so only the first run of a split fits them.

The key hashes the arrays' bytes, shapes and dtypes, the estimator's parameters, scikit-learn's version and
CACHE_VERSION: a different split, data file, mask seed or level list is a different entry, never a stale one.
Entries are written atomically (a crash leaves no half-written file) and an unreadable one is fitted again.

Where: $MC_FIT_CACHE, else data/.cache/fitted of the repository; MC_FIT_CACHE=off fits every time. The files are
pickles: share a cache only between people who trust each other's files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

CACHE_VERSION = 1
CACHE_ENV = "MC_FIT_CACHE"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "data" / ".cache" / "fitted"
log = logging.getLogger(__name__)


def cache_dir() -> Optional[Path]:
    """The cache folder, or None when caching is off ($MC_FIT_CACHE = off, 0 or empty)."""
    value = os.environ.get(CACHE_ENV)
    if value is None:
        return DEFAULT_DIR
    return None if value.strip().lower() in ("", "0", "off", "none", "false") else Path(value)


def fingerprint(*arrays: np.ndarray, **params: Any) -> str:
    """SHA-256 over the arrays (dtype, shape, bytes) and the JSON of `params`."""
    import sklearn

    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "sklearn": sklearn.__version__, **params},
                                  sort_keys=True, default=str).encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def _atomic_dump(value: Any, path: Path) -> None:
    import joblib

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        joblib.dump(value, tmp, compress=3)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached(kind: str, key: str, compute: Callable[[], Any]) -> Any:
    """`compute()`, or its value stored under (kind, key) by an earlier call. A failed write only logs: the value
    is computed again next time."""
    folder = cache_dir()
    if folder is None:
        return compute()
    path = folder / f"{kind}_{key}.joblib"
    if path.is_file():
        import joblib

        try:
            return joblib.load(path)
        except Exception as err:  # a truncated or foreign file: fit again and overwrite it
            log.warning("fit cache %s unreadable (%s); fitting again", path, err)
    value = compute()
    try:
        _atomic_dump(value, path)
    except OSError as err:
        log.warning("could not write the fit cache %s (%s); it is fitted again next time", path, err)
    return value

"""Parametric data: CSV reading and validation, the seeded split, normalisation, and tensor batches."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import difflib
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch

from modules.conditioning import ConditionSchema, canonical_category
from modules.config import DataConfig, SplitConfig
from modules.errors import UserError

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- reading


def read_table(path: str | Path, cfg: DataConfig) -> pd.DataFrame:
    """Read the CSV and check that every configured column exists and every design value is a finite number."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist. Pass --csv_path PATH or set data.csv_path in the config; "
                        "`bash setup.sh` links the data sets where they lie in ../shared/data, and the README "
                        "(Data) says where to get them.")
    categorical = [c.name for c in cfg.conditions if c.kind == "categorical"]
    try:
        frame = pd.read_csv(path, dtype={c: str for c in categorical}, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read as CSV ({err}). Check the file.") from None
    if frame.empty:
        raise UserError(f"{path}: the file has no data rows.")
    needed = list(cfg.design_columns) + [c.name for c in cfg.conditions] + ([cfg.id_column] if cfg.id_column else [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        hints = []
        for name in missing[:5]:
            same_case = [c for c in frame.columns.astype(str) if c.lower().strip() == name.lower().strip()]
            close = same_case or difflib.get_close_matches(name, frame.columns.astype(str), n=1)
            hints.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise UserError(f"{path}: column{'s' if len(missing) > 1 else ''} {', '.join(hints)} named in the config "
                        f"{'are' if len(missing) > 1 else 'is'} not in the file. Fix data.design_columns / "
                        f"data.conditions or the CSV header.")
    if cfg.id_column:
        check_unique_ids(frame, cfg.id_column, path)
    for column in cfg.design_columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan))
        if bad.any():
            rows = np.flatnonzero(bad.to_numpy())
            examples = ", ".join(f"row {r + 2}: {frame[column].iloc[r]!r}" for r in rows[:3])
            raise UserError(f"{path}: design column '{column}' must hold finite numbers; {len(rows)} value(s) do not "
                            f"({examples}; row numbers count the header as row 1). Fix or drop these rows.")
        frame[column] = values.astype(np.float64)
    for spec in cfg.conditions:
        if spec.kind == "numerical":
            values = pd.to_numeric(frame[spec.name], errors="coerce")
            non_numeric = values.isna() & frame[spec.name].notna()
            infinite = np.isinf(values.to_numpy(dtype=np.float64, na_value=np.nan))
            if non_numeric.any() or infinite.any():
                r = int(np.flatnonzero(non_numeric.to_numpy() | infinite)[0])
                raise UserError(f"{path}: numerical condition '{spec.name}' has the value {frame[spec.name].iloc[r]!r} "
                                f"(row {r + 2}), which is not a finite number. Fix it, leave the cell empty "
                                f"(= missing, masked), or declare the condition categorical.")
            frame[spec.name] = values.astype(np.float64)
    return frame


def check_unique_ids(frame: pd.DataFrame, column: str, path) -> None:
    """Every row needs its own id (split.csv, image files and sampling refer to rows by it)."""
    duplicated = frame[column].duplicated(keep=False)
    if duplicated.any():
        rows = np.flatnonzero(duplicated.to_numpy())
        value = frame[column].iloc[rows[0]]
        same = [r + 2 for r in rows if frame[column].iloc[r] == value][:3]
        raise UserError(f"{path}: the id column '{column}' has duplicates ({value!r} in rows "
                        f"{', '.join(map(str, same))}; row numbers count the header as row 1). Every row needs its "
                        "own id: fix the file, or unset data.id_column.")


# --------------------------------------------------------------------------- splitting


def split_rows(frame: pd.DataFrame, cfg: DataConfig, split: SplitConfig) -> np.ndarray:
    """The train/val/test assignment (array of 'train'|'val'|'test'|'unused') of `split.protocol`."""
    return split_with_state(frame, cfg, split)[0]


def split_with_state(frame: pd.DataFrame, cfg: DataConfig, split: SplitConfig) -> tuple[np.ndarray, Optional[int]]:
    """The assignment, and the random_state the authors' protocol settled on (None for the project's protocol).

    The project's protocol is a seeded split with every category in the training split, deterministic in one pass:
    for each category, the first row of the seeded permutation that carries it is put into the training split
    (instead of retrying seeds until coverage happens).
    """
    total = split.train + split.val + split.test
    if abs(total - 1.0) > 1e-6 or min(split.train, split.val, split.test) < 0:
        raise UserError(f"data.split fractions must be ≥ 0 and sum to 1, got train={split.train}, val={split.val}, "
                        f"test={split.test}.")
    if split.protocol == "authors":
        return authors_split(frame, cfg, split)
    n = len(frame)
    order = np.random.default_rng(split.seed).permutation(n)
    n_train = int(round(split.train * n))
    n_val = int(round(split.val * n))
    anchors: list[int] = []
    anchored = set()
    categorical = [c for c in cfg.conditions if c.kind == "categorical"]
    for spec in categorical:
        values = frame[spec.name].map(canonical_category).to_numpy(dtype=object)
        group = spec.vocabulary or spec.name
        for row in order:
            key = (group, values[row])
            if values[row] is not None and key not in anchored:
                anchored.add(key)
                if row not in anchors:
                    anchors.append(row)
    anchor_set = set(anchors)
    rest = [r for r in order if r not in anchor_set]
    n_train = max(n_train, len(anchors))
    train = anchors + rest[: n_train - len(anchors)]
    remaining = rest[n_train - len(anchors):]
    assignment = np.empty(n, dtype=object)
    assignment[train] = "train"
    assignment[remaining[:n_val]] = "val"
    assignment[remaining[n_val:]] = "test"
    if not 0.0 < split.train_fraction <= 1.0:
        raise UserError(f"data.split.train_fraction must lie in (0, 1], got {split.train_fraction}.")
    if split.train_fraction < 1.0:  # drop the end of the seeded order; the category anchors come first
        keep = max(len(anchors), int(round(split.train_fraction * len(train))))
        assignment[train[keep:]] = "unused"
    return assignment, None


AUTHORS_RANDOM_STATE = 42  # the authors' SEED; their split retries with SEED + i


def authors_split(frame: pd.DataFrame, cfg: DataConfig, split: SplitConfig, max_tries: int = 1000
                  ) -> tuple[np.ndarray, int]:
    """The split of the authors' `ensure_good_train_test_split` (train_mcvae.py of Phillip-M97/Masked_Conditioning):
    sklearn `train_test_split(rows, train_size=split.train, shuffle=True, random_state=42 + split.seed + i)` for
    i = 0, 1, … until every category of every categorical column (each column on its own, missing cells aside)
    appears in the training part. No validation part. Returns the assignment and the random_state used."""
    from sklearn.model_selection import train_test_split

    if split.val != 0:
        raise UserError(f"data.split.protocol 'authors' has no validation part; set data.split.val to 0 "
                        f"(got {split.val}), or use protocol 'project'.")
    if split.train_fraction != 1.0:
        raise UserError("data.split.train_fraction < 1 needs data.split.protocol 'project' (the authors' split has "
                        "no seeded training order to shorten).")
    n = len(frame)
    columns = []
    for spec in (c for c in cfg.conditions if c.kind == "categorical"):
        values = frame[spec.name].map(canonical_category).to_numpy(dtype=object)
        columns.append((values, {v for v in values if v is not None}))
    rows = np.arange(n)
    for i in range(max_tries):
        state = AUTHORS_RANDOM_STATE + split.seed + i
        train, test = train_test_split(rows, train_size=split.train, shuffle=True, random_state=state)
        if all(set(values[train]) >= every for values, every in columns):
            assignment = np.empty(n, dtype=object)
            assignment[train] = "train"
            assignment[test] = "test"
            return assignment, state
    raise UserError(f"data.split.protocol 'authors': no random_state from {AUTHORS_RANDOM_STATE + split.seed} to "
                    f"{AUTHORS_RANDOM_STATE + split.seed + max_tries - 1} puts every category into the training part "
                    "(a category with a single design can only be in one part); use protocol 'project', which "
                    "anchors every category in training.")


# --------------------------------------------------------------------------- normalisation


class MinMaxScaler:
    """Min-max normalisation of design columns to [0, 1] with training statistics (a constant column keeps span 1).

    It also keeps the min/max of the whole data file (`dataset_*`): the authors normalise with those, so errors
    reported "on the paper's scale" are measured there (see `evaluation.error_scale`).
    """

    def __init__(self, columns: list[str], minimum: list[float], maximum: list[float],
                 dataset_minimum: Optional[list[float]] = None, dataset_maximum: Optional[list[float]] = None):
        self.columns = list(columns)
        self.minimum = np.asarray(minimum, dtype=np.float64)
        self.maximum = np.asarray(maximum, dtype=np.float64)
        self.span = _span(self.minimum, self.maximum)
        self.dataset_minimum = np.asarray(dataset_minimum if dataset_minimum is not None else minimum, dtype=np.float64)
        self.dataset_maximum = np.asarray(dataset_maximum if dataset_maximum is not None else maximum, dtype=np.float64)

    @classmethod
    def fit(cls, train: pd.DataFrame, columns: list[str], dataset: Optional[pd.DataFrame] = None) -> "MinMaxScaler":
        values = train[columns].to_numpy(dtype=np.float64)
        full = (dataset if dataset is not None else train)[columns].to_numpy(dtype=np.float64)
        return cls(columns, values.min(axis=0).tolist(), values.max(axis=0).tolist(),
                   full.min(axis=0).tolist(), full.max(axis=0).tolist())

    def state_dict(self) -> dict:
        return {"columns": self.columns, "minimum": self.minimum.tolist(), "maximum": self.maximum.tolist(),
                "dataset_minimum": self.dataset_minimum.tolist(), "dataset_maximum": self.dataset_maximum.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> "MinMaxScaler":
        return cls(state["columns"], state["minimum"], state["maximum"], state.get("dataset_minimum"),
                   state.get("dataset_maximum"))

    def error_weights(self, scale: str) -> torch.Tensor:
        """Per-column weights that turn squared errors in this normalisation into squared errors on `scale`
        ('train': this normalisation; 'dataset': min-max over the whole data file, the authors' scale)."""
        if scale == "train":
            return torch.ones(len(self.columns))
        ratio = self.span / _span(self.dataset_minimum, self.dataset_maximum)
        return torch.from_numpy(ratio**2).float()

    def transform(self, frame: pd.DataFrame) -> torch.Tensor:
        values = frame[self.columns].to_numpy(dtype=np.float64)
        return torch.from_numpy((values - self.minimum) / self.span).float()

    def inverse(self, normalised: torch.Tensor) -> pd.DataFrame:
        values = normalised.detach().cpu().double().numpy() * self.span + self.minimum
        return pd.DataFrame(values, columns=self.columns)


def _span(minimum: np.ndarray, maximum: np.ndarray) -> np.ndarray:
    span = maximum - minimum
    return np.where(span > 0, span, 1.0)


# --------------------------------------------------------------------------- batching


class TensorBatches:
    """Batches sliced from tensors that already live on the device (no per-sample `__getitem__`).

    The shuffle order of epoch e is a function of (seed, e) only, so a resumed run sees the same batches.
    With `group` > 1 it yields lists of up to `group` consecutive batches, which a model trains on in one
    Lightning step (`trainer.fused_steps`): for a tiny MLP, Lightning's per-step work costs as much as the step.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], *, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, epoch_fn: Optional[Callable[[], int]] = None, group: int = 1,
                 accumulate: int = 1, skip_fn: Optional[Callable[[], int]] = None, rank: int = 0, world: int = 1):
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch_fn = epoch_fn or (lambda: 0)
        self.accumulate = max(1, accumulate)
        self.skip_fn = skip_fn  # items (Lightning steps) to skip at the start of the next epoch
        # DDP: rank r takes every world-th row of the epoch's order, all ranks the same number of rows
        self.rank, self.world = rank, max(1, world)
        self.group = max(1, group) * self.accumulate  # whole optimizer steps per Lightning step

    @property
    def n(self) -> int:
        rows = self.tensors[0].shape[0]
        return rows // self.world if self.world > 1 else rows

    @property
    def n_batches(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return (self.n + self.batch_size - 1) // self.batch_size

    @property
    def n_optimizer_steps(self) -> int:
        """Optimizer steps per epoch: every `accumulate` batches (a last, shorter run counts as one)."""
        return (self.n_batches + self.accumulate - 1) // self.accumulate

    def __len__(self) -> int:
        return (self.n_batches + self.group - 1) // self.group

    @staticmethod
    def shuffled_order(rows: int, seed: int, epoch: int) -> torch.Tensor:
        """The row order of epoch `epoch` of a run with `seed` (also what modules/stacked.py feeds a stacked model)."""
        return torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(epoch)))

    def _batches(self):
        device = self.tensors[0].device
        rows = self.tensors[0].shape[0]
        if self.shuffle:
            order = self.shuffled_order(rows, self.seed, self.epoch_fn())
        else:
            order = torch.arange(rows) if self.world > 1 else None
        if self.world > 1:
            order = order[self.rank::self.world][: self.n]
        data = self.tensors if order is None else tuple(t.index_select(0, order.to(device)) for t in self.tensors)
        for i in range(self.n_batches):
            yield tuple(t[i * self.batch_size:(i + 1) * self.batch_size] for t in data)

    def _items(self):
        if self.group == 1:
            yield from self._batches()
            return
        chunk = []
        for batch in self._batches():
            chunk.append(batch)
            if len(chunk) == self.group:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def __iter__(self):
        skip = self.skip_fn() if self.skip_fn is not None else 0  # resuming inside an epoch
        for i, item in enumerate(self._items()):
            if i >= skip:
                yield item


class ConditionedDataModule(pl.LightningDataModule):
    """What every data set of this project shares: a table of conditions, the seeded split, the fitted condition
    schema, tensors per split and the tensor-sliced loaders. Subclasses read the data, fill `self.tensors`
    (designs, categorical, numerical per split) and define `_fingerprint_rows()`: one hash per row of what the
    model learns from."""

    def __init__(self, *, batch_size: int, seed: int = 0, fused_steps: int = 1, accumulate: int = 1):
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.fused_steps = fused_steps
        self.accumulate = accumulate
        self.skip_batches: Optional[tuple[int, int]] = None  # (epoch, batches): set when resuming inside an epoch
        self.device = torch.device("cpu")
        self.tensors: dict[str, tuple[torch.Tensor, ...]] = {}

    def _split_and_fit(self, frame: pd.DataFrame, cfg, source: str, schema: Optional[ConditionSchema]) -> pd.DataFrame:
        """Seeded split of `frame` (every category in training) and the schema fitted on the training rows."""
        self.frame = frame
        self.assignment, random_state = split_with_state(frame, cfg, cfg.split)
        sizes = {name: int((self.assignment == name).sum()) for name in SPLITS}
        self.split_summary = (f"data split ({cfg.split.protocol} protocol, seed {cfg.split.seed}"
                              + (f", random_state {random_state}" if random_state is not None else "")
                              + "): " + " / ".join(f"{sizes[k]} {k}" for k in SPLITS))
        if sizes["train"] == 0 or (cfg.split.test > 0 and sizes["test"] == 0):
            raise UserError(f"{source}: {len(frame)} designs split {cfg.split.train}/{cfg.split.val}/"
                            f"{cfg.split.test} leave {sizes} rows per split; the training and test splits need at "
                            "least one design each. Add data or change data.split.")
        train = frame[self.assignment == "train"]
        # a checkpoint brings its own fitted schema (evaluation, sampling, resume)
        self.schema = schema or ConditionSchema.fit(cfg.conditions, train, fixed_vocabularies=cfg.vocabularies,
                                                    source=source)
        return train

    def split_digest(self) -> str:
        """A fingerprint of the data and its split: every row's designs and conditions, in order, with its split.
        Stored in checkpoints, so evaluating or resuming on other data (or reordered rows) is caught."""
        import hashlib

        digest = hashlib.sha256(np.ascontiguousarray(self._fingerprint_rows()).tobytes())
        digest.update("".join(s[0] for s in self.assignment).encode())
        return digest.hexdigest()[:16]

    def check_digest(self, stored: Optional[str], checkpoint: str) -> None:
        """Refuse data other than the data `checkpoint` was trained on (None: an old checkpoint, not checked)."""
        if stored is not None and stored != self.split_digest():
            raise UserError(f"the data file {self.csv_path} is not the one {checkpoint} was trained on, or its rows "
                            "changed or moved (the train/val/test split would differ). Pass the training data "
                            "with --csv_path.")

    @property
    def has_validation(self) -> bool:
        return len(self.tensors["val"][0]) > 0

    def split_frame(self) -> pd.DataFrame:
        """Row number, id (if configured) and split of every row: saved as split.csv in the run directory."""
        out = pd.DataFrame({"row": np.arange(len(self.frame)), "split": self.assignment})
        if self.cfg.id_column:
            out.insert(1, self.cfg.id_column, self.frame[self.cfg.id_column].to_numpy())
        return out

    def part(self, name: str) -> pd.DataFrame:
        return self.frame[self.assignment == name].reset_index(drop=True)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.trainer is not None:
            self.device = self.trainer.strategy.root_device
        self.tensors = {k: tuple(t.to(self.device) for t in v) for k, v in self.tensors.items()}

    def _take_skip(self) -> int:
        """The batches a run resumed inside an epoch skips in that epoch (however often it is iterated)."""
        if self.skip_batches and self.skip_batches[0] == self._current_epoch():
            return self.skip_batches[1]
        return 0

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self):
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return TensorBatches(self.tensors["train"], batch_size=self.batch_size, shuffle=True, seed=self.seed,
                             epoch_fn=self._current_epoch, group=self.fused_steps, accumulate=self.accumulate,
                             skip_fn=self._take_skip, rank=rank, world=world)

    def val_dataloader(self):
        # the training batch size, so that batch-summed losses (`reconstruction: sse`) compare with training
        return TensorBatches(self.tensors["val"], batch_size=self.batch_size, shuffle=False)

    def test_dataloader(self):
        return TensorBatches(self.tensors["test"], batch_size=self.batch_size, shuffle=False)


class ParametricDataModule(ConditionedDataModule):
    """Designs and conditions from one CSV, described by the YAML schema (`DataConfig`)."""

    def __init__(self, cfg: DataConfig, *, batch_size: int, seed: int = 0, csv_path: Optional[str] = None,
                 schema: Optional[ConditionSchema] = None, scaler: Optional[MinMaxScaler] = None,
                 fused_steps: int = 1):
        super().__init__(batch_size=batch_size, seed=seed, fused_steps=fused_steps)
        self.cfg = cfg
        self.csv_path = csv_path or cfg.csv_path
        frame = read_table(self.csv_path, cfg)
        train = self._split_and_fit(frame, cfg, str(self.csv_path), schema)
        self.scaler = scaler or MinMaxScaler.fit(train, list(cfg.design_columns), dataset=self.frame)
        self.tensors = {name: self._encode(self.frame[self.assignment == name]) for name in SPLITS}

    def _encode(self, part: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        design = self.scaler.transform(part)
        cat, num = self.schema.encode(part, source=str(self.csv_path))
        return design, cat, num

    def _fingerprint_rows(self) -> np.ndarray:
        columns = list(self.cfg.design_columns) + [c.name for c in self.cfg.conditions]
        return pd.util.hash_pandas_object(self.frame[columns], index=False).to_numpy()

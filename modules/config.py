"""Typed run configuration, loaded from YAML and validated: unknown keys and wrong types name the key and the file."""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from modules.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# --------------------------------------------------------------------------- schema of the data


@dataclass
class ConditionSpec:
    name: str  # CSV column
    kind: Literal["categorical", "numerical"]
    categories: Optional[list] = None  # fixes the vocabulary order; default: sorted training values
    vocabulary: Optional[str] = None  # columns naming the same vocabulary share one vocabulary and embedding table


SPLIT_DEFAULTS = {"project": (0.8, 0.1, 0.1), "authors": (0.85, 0.0, 0.15)}  # train, val, test per protocol


@dataclass
class SplitConfig:
    train: Optional[float] = None  # fractions; default 0.8 / 0.1 / 0.1 (project), 0.85 / 0 / 0.15 (authors)
    val: Optional[float] = None
    test: Optional[float] = None
    seed: int = 0
    # train on this fraction of the training split only (seeded; every category kept); validation and test
    # splits do not change, so data-set size studies compare on the same test designs
    train_fraction: float = 1.0
    # project: a seeded train/val/test split with every category anchored in the training part (the default);
    # authors: the authors' split, sklearn train_test_split(train_size=0.85, random_state=42 + seed + i) with i
    # raised until every category of every categorical column is in the training part, and no validation part
    # (seed 0 is the split of their published code)
    protocol: Literal["project", "authors"] = "project"

    def __post_init__(self):
        train, val, test = SPLIT_DEFAULTS[self.protocol]
        self.train = train if self.train is None else self.train
        self.val = val if self.val is None else self.val
        if self.test is None:  # the authors' test part is what train_test_split leaves
            self.test = round(1.0 - self.train - self.val, 10) if self.protocol == "authors" else test


@dataclass
class DataConfig:
    csv_path: str
    design_columns: list[str]
    conditions: list[ConditionSpec]
    id_column: Optional[str] = None  # saved with the split so a user can see which design went where
    vocabularies: dict[str, list] = field(default_factory=dict)  # shared vocabularies with a fixed order
    split: SplitConfig = field(default_factory=SplitConfig)
    # how sample.py --plot draws designs (modules.plotting.resolve_plot_style): auto = bike for BIKED's columns,
    # points when every design column pairs up as (x, y), else columns (generated vs real designs per column);
    # none: no drawing of the shapes, --plot shows the columns picture
    plot_style: Literal["auto", "bike", "profile", "points", "columns", "none"] = "auto"
    # geometric validity checks of generated designs in evaluation (modules/design_checks.py); null = none
    design_checks: Optional[Literal["bike"]] = None
    outline_points: Optional[int] = None  # profile: the first N (x, y) points form a closed outline; the rest are dots


# --------------------------------------------------------------------------- shared training sections


@dataclass
class ConditioningConfig:
    embedding_dim: int = 5  # per condition; the condition vector has n_conditions * embedding_dim entries
    numerical_mask: Literal["sentinel", "learned"] = "learned"  # README, "Masking numerical conditions"
    sentinel: float = -1.0  # value of a masked numerical condition after min-max normalisation to [0, 1]


@dataclass
class SparsityConfig:
    schedule: Literal["constant", "step", "linear", "exponential", "cosine"] = "linear"
    initial: float = 0.1
    target: Optional[float] = 0.2  # ignored by `constant`
    target_at: int = -1  # epoch or step at which `target` is reached; -1 = end of training
    step_size: int = 10  # epochs or steps between stairs of the `step` schedule
    exponential_rate: float = 5.0  # curvature of the `exponential` schedule (> 0: slow start, fast end)
    interval: Literal["epoch", "step"] = "epoch"


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.1
    gradient_clip_val: Optional[float] = None  # clip the gradient norm; null = no clipping


@dataclass
class LRSchedulerConfig:
    # step: lr·γ^⌊epoch / step_size⌋; cosine: lr → min_lr_ratio·lr along a half cosine over trainer.max_epochs
    # (Loshchilov & Hutter 2017), so the last epochs take small steps and the final weights do not depend on
    # where a constant-rate run happens to stop
    name: Literal["none", "step", "cosine"] = "step"
    step_size: int = 100  # epochs
    gamma: float = 0.9
    min_lr_ratio: float = 0.0  # cosine: the rate at the end of training, as a share of optimizer.lr


class HalfCosine:
    """The lr factor of epoch e: m + (1 − m)·(1 + cos(π·e / epochs)) / 2, held at m from `epochs` on (SGDR without
    restarts, Loshchilov & Hutter 2017, Eq. 5). An object, not a lambda, so that LambdaLR saves `epochs` in the
    checkpoint: a run resumed with a larger --max_epochs keeps the horizon of its first start, as the sparsity
    schedule does, instead of jumping to another curve."""

    def __init__(self, epochs: int, min_ratio: float):
        self.epochs, self.min_ratio = max(int(epochs), 1), float(min_ratio)

    def __call__(self, epoch: int) -> float:
        progress = min(epoch, self.epochs) / self.epochs
        return self.min_ratio + (1 - self.min_ratio) * (1 + math.cos(math.pi * progress)) / 2


def build_lr_scheduler(optimizer, s: LRSchedulerConfig, max_epochs: int):
    """The per-epoch scheduler of `lr_scheduler` for `optimizer` (None for `none`); stepped at every epoch's end."""
    import torch

    if s.name == "none":
        return None
    if s.name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, HalfCosine(max_epochs, s.min_lr_ratio))
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)


@dataclass
class TrainerConfig:
    max_epochs: int = 500
    batch_size: int = 128
    seed: int = 42
    check_val_every_n_epoch: int = 1
    checkpoint_every_n_epochs: int = 1  # last.ckpt (the resume point); always written after the final epoch
    # also write last.ckpt every N optimizer steps (mid-epoch; a resumed run continues at that batch); null = off
    checkpoint_every_n_steps: Optional[int] = None
    log_every_n_steps: int = 50
    accelerator: str = "auto"
    devices: Union[int, str] = "auto"
    num_threads: Optional[int] = None  # torch intra-op threads; small MLPs are fastest with 1
    # optimizer steps (batches) per Lightning step: > 1 saves Lightning's per-step overhead on tiny models;
    # the optimisation itself (batches, order, masks, noise, sparsity per step) is the same
    fused_steps: int = 1
    accumulate_grad_batches: int = 1  # batches per optimizer step (gradients averaged)
    # Lightning precision: 32-true, bf16-mixed, 16-mixed; bf16-mixed falls back to 16-mixed on GPUs without bf16
    precision: str = "32-true"
    num_nodes: int = 1
    strategy: str = "auto"  # ddp for several devices or nodes (Lightning strategy name)
    # deterministic kernels: a resumed run is bit-equal to an uninterrupted one. false lets cuDNN pick the fastest
    # (non-deterministic) kernels and TF32 matmuls on CUDA: same data, masks and noise, last bits may differ
    deterministic: bool = True


@dataclass
class EvaluationConfig:
    sparsity_levels: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(10)])
    # squared errors on the min-max scale of the whole data file (the authors' normalisation, so the paper's
    # tables compare) or of the training split (the model's own normalisation)
    error_scale: Literal["dataset", "train"] = "dataset"
    mask_seed: int = 0
    paper_z_seed: int = 42  # one z shared by every test design, as the authors' evaluation does
    prior_draws: int = 8
    adherence: bool = True
    # model-free baselines scored on the same masks (parametric data): the mean training design, a random forest
    # from the masked conditions to the design, k random training designs (README, "Evaluation")
    baselines: bool = True
    # k: the energy score, mean-of-k and best-of-k errors, validity and novelty; image models: 0 skips them (they
    # cost k samplings per test image and level)
    samples_per_design: int = 16
    sample_seed: int = 1  # seed of those k samples per design
    diversity_groups: int = 50  # condition groups used for the diversity comparison
    diversity_samples: int = 16  # designs generated per group
    max_images: Optional[int] = None  # image models: evaluate the first N images of the split (null = all)
    # image models: test rows generated per category of each categorical condition for the asked-for adherence
    # (that condition set to the category, the rest kept; 0 skips it: it costs Σ categories × rows samplings)
    asked_for_rows: int = 200
    # image models: Fréchet distance per sparsity with Inception-v3 (needs torch-fidelity and the weights file
    # below), the adherence classifier's features (this data set only), auto (Inception when present), or none
    fid: Literal["auto", "inception", "classifier", "none"] = "auto"
    inception_weights: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth


@dataclass
class WandbConfig:
    project: str = "masked-conditioning"
    entity: Optional[str] = None


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (lists to tuples, mappings to dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return build_dataclass(tp, value, source=source, prefix=key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise _Mismatch
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key, source)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is type(None):
        if value is not None:
            raise _Mismatch
        return None
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        _, val_tp = typing.get_args(tp)
        return {k: _convert(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise _Mismatch
        return value
    if tp in (list, dict):
        if not isinstance(value, tp):
            raise _Mismatch
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def build_dataclass(cls: type, values: dict, *, source: str, prefix: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys, missing keys and wrong types raise `UserError`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise UserError(
            f"{source}: unknown key '{prefix}{unknown[0]}'. Valid keys under "
            f"'{prefix.rstrip('.') or 'the top level'}': {', '.join(fields)}. Fix the spelling or remove the key."
        )
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{source}: missing required key '{key}' ({_type_name(hints[name])}). Add it to the file.")
            continue
        try:
            kwargs[name] = _convert(values[name], hints[name], key, source)
        except _Mismatch:
            raise UserError(
                f"{source}: key '{key}' must be {_type_name(hints[name])}, got {values[name]!r} "
                f"({type(values[name]).__name__}). Fix the value in the file."
            ) from None
    return cls(**kwargs)


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist. Pass --cfg_name NAME for configs/NAME.yaml or --config PATH.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text (UTF-8) file; --config takes a YAML file.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"{path}: YAML syntax error{where}: {problem}. Fix the file and run again.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}.")
    return data


def config_path(cfg_name: Optional[str], config: Optional[str]) -> Path:
    """The YAML file named by --config PATH or --cfg_name NAME (configs/NAME.yaml)."""
    if config:
        return Path(config)
    if not cfg_name:
        raise UserError("no configuration given: pass --cfg_name NAME (a file in configs/) or --config PATH.")
    path = CONFIG_DIR / f"{cfg_name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise UserError(f"--cfg_name {cfg_name}: there is no {path}. Available: {', '.join(names)}.")
    return path


def to_dict(cfg) -> dict:
    """Plain-Python (YAML/checkpoint-safe) form of a config dataclass."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


# --------------------------------------------------------------------------- dotted overrides (--set KEY=VALUE)


def parse_assignment(text: str, flag: str = "--set") -> tuple[str, Any]:
    """'optimizer.lr=3e-4' → ('optimizer.lr', 0.0003); the value is read as YAML (numbers, true/false, null, [a, b])."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"{flag} {text!r} must have the form SECTION.KEY=VALUE (or KEY=VALUE for a top-level key), "
                        f"e.g. {flag} optimizer.lr=3e-4.")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not valid YAML: keep the text
    if isinstance(parsed, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", parsed):
        parsed = float(parsed)  # YAML 1.1 reads 3e-4 (no dot) as text
    return key.strip(), parsed


def check_dotted_key(cls: type, key: str, flag: str = "--set") -> None:
    """A dotted key must name a field of the config dataclass `cls`, section by section; the error lists the valid
    keys where the path leaves the schema (a mapping-valued field, such as a dict of names, ends the check)."""
    node, path = cls, []
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            if typing.get_origin(node) is dict or node is dict or node is Any:
                return  # a free mapping: its keys are data, not schema
            raise UserError(f"{flag} {key}: '{'.'.join(path)}' is a value, not a section; set it directly "
                            f"({flag} {'.'.join(path)}=VALUE).")
        hints = typing.get_type_hints(node)
        if part not in hints:
            where = ".".join(path) or "the top level"
            raise UserError(f"{flag} {key}: unknown key '{part}' under {where}. Valid keys there: "
                            f"{', '.join(f.name for f in dataclasses.fields(node))}.")
        path.append(part)
        node = hints[part]
        # Optional[Section] → Section
        if typing.get_origin(node) in (Union, types.UnionType):
            sections = [a for a in typing.get_args(node) if dataclasses.is_dataclass(a)]
            node = sections[0] if sections else node


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set `key` (dotted) in a raw config mapping, creating sections that are absent."""
    node = raw
    *parents, last = key.split(".")
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"cannot set {key}: {'.'.join(parents[:i + 1])} is {child!r}, not a section.")
        node = child
    node[last] = value

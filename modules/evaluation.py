"""Evaluation of parametric models: per-sparsity error, condition adherence and diversity."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from modules import design_checks, fit_cache, scoring
from modules.baselines import ConditionalForest, informative, majority_scores
from modules.conditioning import MaskedConditions
from modules.config import EvaluationConfig
from modules.errors import UserError
from modules.progress import bar, shows_progress

# the file (and table) of the errors per sparsity, by the error it holds: parametric models report per-design sums
# of squared errors (SSE) and energy scores, image models the pixel MSE
ERROR_TABLES = {"sse": "errors_per_sparsity", "mse": "mse_per_sparsity"}


def error_table_path(eval_dir: Path) -> Path:
    """<eval_dir>/errors_per_sparsity.csv (parametric) or mse_per_sparsity.csv (images, and parametric runs
    evaluated before the file was renamed), whichever the folder has."""
    for stem in (ERROR_TABLES["sse"], ERROR_TABLES["mse"]):
        path = Path(eval_dir) / f"{stem}.csv"
        if path.is_file():
            return path
    raise FileNotFoundError(f"{eval_dir} has neither {ERROR_TABLES['sse']}.csv nor {ERROR_TABLES['mse']}.csv; "
                            "evaluate the run first (python evaluate.py --ckpt ...).")


def level_column(level: float) -> str:
    """The adherence table's column of a sparsity level ("0", "0.1", …)."""
    return f"{level:g}"


def count_column(level: float) -> str:
    """The adherence table's column with the number of designs scored at a level ("n_0", "n_0.1", …)."""
    return f"n_{level:g}"


def _generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def mask_draws(cat: torch.Tensor, num: torch.Tensor, cfg: EvaluationConfig) -> torch.Tensor:
    """One seeded U[0, 1) per condition of every design; level p masks where U < p, so the masks of the levels
    are nested and a level's masks do not depend on which other levels are evaluated."""
    g = _generator(cfg.mask_seed, cat.device)
    return torch.rand((cat.shape[0], cat.shape[1] + num.shape[1]), generator=g, device=cat.device)


def level_masks(model, cat: torch.Tensor, num: torch.Tensor, level: float, uniform: torch.Tensor) -> MaskedConditions:
    """Independent per-element masks at sparsity `level` (missing values stay masked)."""
    cat_mask, num_mask = model.masking.random_masks(cat, num, level, uniform=uniform)
    return model.masking.apply(cat, num, cat_mask, num_mask)


@torch.no_grad()
def error_per_sparsity(model, target, cat, num, cfg: EvaluationConfig, *, error: Callable[[torch.Tensor], float],
                       name: str) -> pd.DataFrame:
    """`error(generated)` against the targets at each sparsity level, under two latent protocols:
    `<name>_paper`: one z ~ N(0, I) (seed `paper_z_seed`) shared by every design, as the authors' evaluation;
    `<name>_prior`: a fresh z per design, averaged over `prior_draws` draws (± `<name>_prior_std`, NaN for a
    single draw: one draw has no spread to measure).
    """
    g_paper = _generator(cfg.paper_z_seed, target.device)
    z_paper = torch.randn((1, *model.latent_shape), generator=g_paper, device=target.device)
    uniform = mask_draws(cat, num, cfg)
    rows = []
    progress = bar(desc="single-z and prior errors", total=len(cfg.sparsity_levels) * (1 + cfg.prior_draws),
                   unit="generation")
    for i, level in enumerate(cfg.sparsity_levels):
        conditions = level_masks(model, cat, num, level, uniform)
        paper = error(model.generate(conditions, z=z_paper.expand(len(target), *z_paper.shape[1:])))
        progress.update()
        g = _generator(cfg.paper_z_seed + 1 + i, target.device)
        draws = []
        for _ in range(cfg.prior_draws):
            draws.append(error(model.generate(conditions, generator=g)))
            progress.update()
        rows.append({"sparsity": level, f"{name}_paper": paper, f"{name}_prior": float(np.mean(draws)),
                     f"{name}_prior_std": float(np.std(draws)) if len(draws) > 1 else float("nan")})
    progress.close()
    return _with_mean(pd.DataFrame(rows))


def sse_per_sparsity(model, design, cat, num, cfg: EvaluationConfig) -> pd.DataFrame:
    """Mean per-design Σ squared error in the min-max normalised design space (`cfg.error_scale`) per level."""
    weights = model.scaler.error_weights(cfg.error_scale).to(design.device)
    return error_per_sparsity(model, design, cat, num, cfg, name="sse",
                              error=lambda generated: ((generated - design).pow(2) * weights).sum(1).mean().item())


# --------------------------------------------------------------------------- k samples per design


@torch.no_grad()
def draw_samples(model, conditions: MaskedConditions, k: int, generator: torch.Generator,
                 chunk: int = 8192) -> torch.Tensor:
    """k generated outputs for every row of `conditions`: (N, k, *output shape), in the model's own space."""
    n = len(conditions)
    repeated = MaskedConditions(conditions.categorical.repeat_interleave(k, dim=0),
                                conditions.numerical.repeat_interleave(k, dim=0),
                                conditions.numerical_mask.repeat_interleave(k, dim=0))
    out = torch.cat([model.generate(repeated.rows(s, s + chunk), generator=generator)
                     for s in range(0, n * k, chunk)])
    return out.reshape(n, k, *out.shape[1:])


SAMPLE_CHUNK_ELEMENTS = 1 << 24  # sample elements scored at once


@torch.no_grad()
def sample_based_per_sparsity(model, target, cat, num, cfg: EvaluationConfig, *, train: torch.Tensor, name: str,
                              weights: Optional[torch.Tensor] = None, per_feature: bool = False,
                              to_space: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                              forest: Optional[ConditionalForest] = None,
                              on_samples: Optional[Callable[[float, torch.Tensor], None]] = None) -> pd.DataFrame:
    """Per level, from `cfg.samples_per_design` samples per test target (seeded, the masks of `mask_draws`): the
    energy score, the error of the mean of the k samples and the best-of-k error (`modules.scoring`), with the
    baselines beside them, all on the same masks. One implementation for designs and images:

    - `weights` put the squared differences on the evaluation scale (designs); `per_feature` divides the squared
      errors by the number of features (images: pixel MSE), the energy score stays a distance;
    - `train` are the training examples, mapped into the model's space by `to_space` (images: uint8 → value
      range), for the baselines: their mean (`train_mean_<name>`, `train_mean_energy_score`) and k random ones
      (`train_sample_energy_score`); a `forest` (designs) adds the conditional regressor;
    - `on_samples(level, samples)` sees each level's samples (N, k, …) (the validity checks of designs; it keeps
      them all in memory).

    Targets are scored in chunks (≈ 16 M sample elements each), so 256 px images fit in memory.
    """
    k = cfg.samples_per_design
    to_space = to_space or (lambda x: x)
    scale = 1.0 / target[0].numel() if per_feature else 1.0
    uniform = mask_draws(cat, num, cfg)
    g = _generator(cfg.sample_seed, target.device)
    g_train = torch.Generator().manual_seed(cfg.sample_seed + 1)
    train_mean = _chunked_mean(train, to_space).to(target.device)
    chunk = max(1, SAMPLE_CHUNK_ELEMENTS // (k * target[0].numel()))

    def point(prediction: torch.Tensor) -> dict[str, float]:  # a point predictor as one sample per target
        return {name: float(scoring.squared_errors(prediction[:, None], target, weights).mean()) * scale,
                "energy_score": float(scoring.energy_score(prediction[:, None], target, weights).mean())}

    mean_scores = point(train_mean[None].expand_as(target))
    rows = []
    starts = range(0, len(target), chunk)
    progress = bar(desc=f"{k} samples per {'image' if per_feature else 'design'}",
                   total=len(cfg.sparsity_levels) * len(starts), unit="chunk")
    for level in cfg.sparsity_levels:
        conditions = level_masks(model, cat, num, level, uniform)
        parts, kept = [], []
        for start in starts:
            samples = draw_samples(model, conditions.rows(start, start + chunk), k, g)
            parts.append(scoring.sample_errors(samples, target[start:start + chunk], weights, per_feature=per_feature))
            if on_samples is not None:
                kept.append(samples)
            progress.update()
        if on_samples is not None:
            on_samples(level, torch.cat(kept))
        errors = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        row = {"sparsity": level, "energy_score": float(errors["energy_score"].mean()),
               f"{name}_mean_of_k": float(errors["sse_mean_of_k"].mean()),
               f"{name}_best_of_k": float(errors["sse_best_of_k"].mean()),
               f"train_mean_{name}": mean_scores[name], "train_mean_energy_score": mean_scores["energy_score"]}
        if forest is not None:
            forest_scores = point(forest.predict(conditions).to(target.device))
            row.update({f"conditional_forest_{name}": forest_scores[name],
                        "conditional_forest_energy_score": forest_scores["energy_score"]})
        picks = torch.randint(len(train), (len(target), k), generator=g_train)
        row["train_sample_energy_score"] = float(torch.cat([
            scoring.energy_score(to_space(train[picks[start:start + chunk].reshape(-1).to(train.device)].to(
                target.device)).reshape(-1, k, *target.shape[1:]), target[start:start + chunk], weights)
            for start in range(0, len(target), chunk)]).mean())
        rows.append(row)
    progress.close()
    return _with_mean(pd.DataFrame(rows))


def _chunked_mean(x: torch.Tensor, to_space: Callable[[torch.Tensor], torch.Tensor], chunk: int = 512) -> torch.Tensor:
    """The mean over the first axis of `to_space(x)`, summed in chunks in float64 (a large image split)."""
    total = None
    for start in range(0, len(x), chunk):
        part = to_space(x[start:start + chunk]).double().sum(dim=0)
        total = part if total is None else total + part
    return (total / len(x)).float()


def _with_mean(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a last row `mean` over the levels."""
    mean = {"sparsity": "mean", **{c: table[c].mean() for c in table.columns if c != "sparsity"}}
    return pd.concat([table.astype({"sparsity": object}), pd.DataFrame([mean])], ignore_index=True)


# --------------------------------------------------------------------------- adherence


def fit_condition_predictors(designs: np.ndarray, cat: np.ndarray, num: np.ndarray, schema, seed: int = 0) -> dict:
    """One random forest per condition, predicting it from a (normalised) design; fitted on real training designs,
    or read from the fit cache when these designs and labels have been fitted before (modules/fit_cache.py)."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    def fitted(kind: str, estimator, x: np.ndarray, y: np.ndarray):
        key = fit_cache.fingerprint(x, y, kind=kind, trees=50, min_leaf=2, seed=seed)
        # fitted on all cores; predicting on one sums the trees in a fixed order (the same figures every run)
        return fit_cache.cached(f"adherence_{kind}", key, lambda: estimator.fit(x, y).set_params(n_jobs=1))

    predictors = {}
    tokens = schema.mask_tokens()
    progress = bar(desc="adherence forests", total=len(schema.conditions), unit="condition")
    for j, cond in enumerate(schema.categorical):
        known = cat[:, j] != tokens[j]
        if len(np.unique(cat[known, j])) >= 2:  # else there is nothing to predict
            clf = RandomForestClassifier(n_estimators=50, min_samples_leaf=2, n_jobs=-1, random_state=seed)
            predictors[cond.name] = ("categorical", j, fitted("categorical", clf, designs[known], cat[known, j]))
        progress.update()
    for j, cond in enumerate(schema.numerical):
        known = ~np.isnan(num[:, j])
        reg = RandomForestRegressor(n_estimators=50, min_samples_leaf=2, n_jobs=-1, random_state=seed)
        predictors[cond.name] = ("numerical", j, fitted("numerical", reg, designs[known], num[known, j]))
        progress.update()
    progress.close()
    return predictors


def _score(kind: str, prediction: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy (categorical) or R² (numerical) of a predictor's `prediction` against `truth`."""
    if len(truth) == 0:
        return float("nan")
    if kind == "categorical":
        return float(np.mean(prediction == truth))
    from sklearn.metrics import r2_score

    return float(r2_score(truth, prediction)) if len(truth) > 1 else float("nan")


@torch.no_grad()
def adherence(model, predictors: dict, design, cat, num, cfg: EvaluationConfig, *, train_cat=None,
              train_num=None) -> pd.DataFrame:
    """Accuracy (categorical) / R² (numerical) of the condition predictors on real test designs and on designs
    generated from the test conditions at each sparsity level, scored on the conditions that were not masked;
    `n`: the real test designs scored, `n_<level>`: the generated designs scored at that level.

    `majority`: the score without looking at the design (most frequent training category; R² of the training
    mean), from the training conditions `train_cat`/`train_num`. `informative`: the real designs clear it
    (`modules.baselines.informative`); only for those conditions does adherence say something.
    """
    real = design.cpu().numpy()
    cat_np, num_np = cat.cpu().numpy(), num.cpu().numpy()
    rows = {name: {"condition": name, "kind": kind, "metric": "accuracy" if kind == "categorical" else "r2"}
            for name, (kind, _, _) in predictors.items()}
    for name, (kind, j, predictor) in predictors.items():
        truth, known = _truth(kind, j, cat_np, num_np, model)
        if train_cat is not None:
            train_truth, train_known = _truth(kind, j, np.asarray(train_cat), np.asarray(train_num), model)
            rows[name]["majority"] = majority_scores(kind, train_truth[train_known], truth[known])
        rows[name]["real"] = _score(kind, predictor.predict(real)[known], truth[known])
        if train_cat is not None:
            rows[name]["informative"] = informative(kind, rows[name]["real"], rows[name]["majority"], int(known.sum()))
        rows[name]["n"] = int(known.sum())
    g = _generator(cfg.paper_z_seed + 1000, design.device)
    uniform = mask_draws(cat, num, cfg)
    counts = {name: {} for name in rows}
    generated, masked_cat, masked_num = [], [], []
    for level in bar(cfg.sparsity_levels, desc="adherence of generated designs", unit="level"):
        conditions = level_masks(model, cat, num, level, uniform)
        generated.append(model.generate(conditions, generator=g).cpu().numpy())
        masked_cat.append(conditions.categorical.cpu().numpy() == model.masking.mask_tokens.cpu().numpy())
        masked_num.append(conditions.numerical_mask.cpu().numpy())
    n = len(design)
    for name, (kind, j, predictor) in predictors.items():
        # one prediction for all levels' designs (a forest predicts row by row): 1 call per condition, not 10
        predicted = predictor.predict(np.concatenate(generated))
        truth, known = _truth(kind, j, cat_np, num_np, model)
        for i, level in enumerate(cfg.sparsity_levels):
            keep = known & ~(masked_cat[i][:, j] if kind == "categorical" else masked_num[i][:, j])
            rows[name][level_column(level)] = _score(kind, predicted[i * n:(i + 1) * n][keep], truth[keep])
            counts[name][count_column(level)] = int(keep.sum())
    return pd.DataFrame([{**rows[name], **counts[name]} for name in rows])


def _truth(kind, j, cat_np, num_np, model):
    if kind == "categorical":
        truth = cat_np[:, j]
        return truth, truth != model.masking.mask_tokens.cpu().numpy()[j]
    truth = num_np[:, j]
    return truth, ~np.isnan(truth)


# --------------------------------------------------------------------------- diversity


def _mean_pairwise_distance(x: torch.Tensor) -> float:
    x = x.flatten(1).float()
    n = x.shape[0]
    if n < 2:
        return float("nan")
    d = torch.cdist(x, x)
    return float(d.sum() / (n * (n - 1)))


@torch.no_grad()
def diversity(model, design, cat, num, cfg: EvaluationConfig) -> pd.DataFrame:
    """Mean pairwise distance of designs generated for the same conditions vs. real designs sharing them.

    Groups: designs with equal categorical conditions and numerical conditions in the same tenth of their range.
    A collapsed model (one design per condition) scores well on the single-z error but near 0 here.
    """
    num_bins = torch.where(torch.isnan(num), torch.full_like(num, -1), torch.floor(num.clamp(0, 1) * 9.999))
    keys = torch.cat([cat.double(), num_bins.double()], dim=1).cpu().numpy()
    _, group_of, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    group_of = group_of.reshape(-1)
    big = [g for g in np.argsort(-counts, kind="stable") if counts[g] >= 2][: cfg.diversity_groups]
    rows = []
    g = _generator(cfg.paper_z_seed + 2000, design.device)
    for group in bar(big, desc="diversity", unit="group"):
        members = np.flatnonzero(group_of == group)[:64]
        first = int(members[0])
        cat_rep = cat[first:first + 1].expand(cfg.diversity_samples, -1)
        num_rep = num[first:first + 1].expand(cfg.diversity_samples, -1)
        conditions = model.masking.apply(cat_rep, num_rep, torch.zeros_like(cat_rep, dtype=torch.bool),
                                         torch.zeros_like(num_rep, dtype=torch.bool))
        generated = model.generate(conditions, generator=g)
        rows.append({"group_size": int(counts[group]), "real": _mean_pairwise_distance(design[members]),
                     "generated": _mean_pairwise_distance(generated)})
    per_group = pd.DataFrame(rows, columns=["group_size", "real", "generated"])
    overall_generated = model.generate(model.masking.mask_all(min(len(design), 512), device=design.device),
                                       generator=g)
    summary = pd.DataFrame([
        {"comparison": "same conditions (mean over groups)", "groups": len(per_group),
         "real": per_group["real"].mean() if len(per_group) else float("nan"),
         "generated": per_group["generated"].mean() if len(per_group) else float("nan")},
        {"comparison": "all designs (generated: all conditions masked)", "groups": 1,
         "real": _mean_pairwise_distance(design[:512]), "generated": _mean_pairwise_distance(overall_generated)},
    ])
    summary["generated/real"] = summary["generated"] / summary["real"]
    return summary


# --------------------------------------------------------------------------- the whole evaluation


def evaluation_inputs(model, dm, out_dir: Path, split: str, cfg: Optional[EvaluationConfig], *,
                      tensors: Optional[tuple] = None):
    """(config, output folder, the split's tensors on the model's device, or the given ones); the model in eval
    mode."""
    cfg = cfg or model.cfg.evaluation
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    tensors = tuple(t.to(model.device) for t in (tensors if tensors is not None else dm.tensors[split]))
    if len(tensors[0]) == 0:
        raise UserError(f"the {split} split is empty; give it a non-zero fraction in data.split or evaluate "
                        "another --split.")
    return cfg, out_dir, tensors


@shows_progress
def evaluate_parametric(model, dm, out_dir: Path, *, split: str = "test", cfg: Optional[EvaluationConfig] = None,
                        wandb_run=None, quiet: bool = False) -> dict:
    """Write eval/{errors_per_sparsity,adherence,diversity,validity}.csv, their plots and summary.json; returns the
    tables. Baselines (`modules.baselines`) are scored on the same split and the same masks as the model. Unless
    `quiet`, every stage prints a line and the long ones draw a progress bar on a terminal's stderr."""
    cfg, out_dir, (design, cat, num) = evaluation_inputs(model, dm, out_dir, split, cfg)
    train_design, train_cat, train_num = (t.to(model.device) for t in dm.tensors["train"])
    progress = _Progress(quiet)
    progress("single-z errors")
    errors = sse_per_sparsity(model, design, cat, num, cfg)
    forest = None
    if cfg.baselines:
        progress("conditional forest baseline")
        forest = ConditionalForest(model, train_design, train_cat, train_num, cfg.sparsity_levels, seed=cfg.mask_seed)
    progress(f"{cfg.samples_per_design} samples per design")
    weights = model.scaler.error_weights(cfg.error_scale).to(design.device)
    checks = dm.cfg.design_checks
    validity = [design_checks.validity_row("real test designs", design, model.scaler, train_design, weights, checks)]
    sampled = sample_based_per_sparsity(
        model, design, cat, num, cfg, train=train_design, name="sse", weights=weights, forest=forest,
        on_samples=lambda level, samples: validity.append(design_checks.validity_row(
            f"generated, sparsity {level:g}", samples.flatten(0, 1), model.scaler, train_design, weights, checks)))
    validity = pd.DataFrame(validity)
    error_table = ERROR_TABLES["sse"]
    tables = {error_table: errors.merge(sampled, on="sparsity", sort=False)}
    if cfg.adherence:
        progress("adherence")
        tr_design, tr_cat, tr_num = (t.cpu().numpy() for t in dm.tensors["train"])
        predictors = fit_condition_predictors(tr_design, tr_cat, tr_num, model.schema, seed=cfg.mask_seed)
        tables["adherence"] = adherence(model, predictors, design, cat, num, cfg, train_cat=tr_cat, train_num=tr_num)
    progress("diversity")
    tables["diversity"] = diversity(model, design, cat, num, cfg)
    tables["validity"] = validity
    progress.done()
    figures = save_tables(tables, out_dir, error_name="sse")
    table = tables[error_table].set_index("sparsity")
    summary = {"split": split, "n_designs": int(len(design)), "samples_per_design": cfg.samples_per_design,
               "error_scale": cfg.error_scale,
               **{column: {str(k): float(v) for k, v in table[column].items()} for column in table.columns},
               "diversity": tables["diversity"].to_dict(orient="records"),
               "validity": tables["validity"].to_dict(orient="records")}
    if dm.cfg.design_checks:
        summary["design_checks"] = {name: text for name, (text, _) in
                                    design_checks.GEOMETRY_CHECKS[dm.cfg.design_checks].items()}
    if "adherence" in tables:
        summary["adherence"] = tables["adherence"].to_dict(orient="records")
    scale = "whole data file" if cfg.error_scale == "dataset" else "training split"
    k = cfg.samples_per_design
    printed = printed_tables(tables, "sse")
    publish(out_dir, tables, figures, summary, wandb_run=wandb_run, quiet=quiet, printed=printed, headings={
        error_table: f"Errors per evaluation sparsity on the {split} split ({len(design)} designs; min-max scale "
                            f"of the {scale}). single_z: the paper's protocol (one z for every design); prior: a z per "
                            f"design; ES: energy score from {k} samples per design (lower is better, proper); "
                            f"mean_of_k / best_of_k: SSE of the mean / the closest of the {k} samples:",
        "baselines": "Baselines on the same masks: SSE and ES of the mean training design (train_mean) and of a random "
                     "forest regressing the design on the masked conditions (forest); ES of k random training "
                     "designs (train_sample):",
        "adherence": "Condition adherence (accuracy / R² of a predictor fitted on real training designs; majority: "
                     "without looking at the design; informative: real designs clear it; n: real designs scored):",
        "adherence_n": ADHERENCE_COUNTS_HEADING.format(what="Generated designs"),
        "diversity": "Diversity (mean pairwise distance, normalised design space):",
        "validity": "Validity and novelty (shares of designs; distance to the nearest training design):"})
    return tables


ADHERENCE_COUNTS_HEADING = ("{what} scored per condition and sparsity (the conditions neither missing nor masked; "
                            "adherence.csv: n_<level>):")


def printed_tables(tables: dict[str, pd.DataFrame], name: str) -> dict[str, pd.DataFrame]:
    """The tables as printed where they differ from the CSVs: the error table with short column names (the CSV
    keeps the long ones), the model's errors and, apart, the baselines' (`name`: the error, sse or mse; columns a
    table lacks are left out); the adherence scores without their counts, and the counts per level apart
    (`adherence_n`), so neither is wider than the terminal."""
    printed = _printed_errors(tables[ERROR_TABLES[name]], name)
    if "adherence" in tables:
        adherence = tables["adherence"]
        counts = [c for c in adherence.columns if str(c).startswith("n_")]
        printed["adherence"] = adherence.drop(columns=counts)
        printed["adherence_n"] = adherence[["condition", *counts]].rename(
            columns={c: c[len("n_"):] for c in counts})
    return printed


def _printed_errors(table: pd.DataFrame, name: str) -> dict[str, pd.DataFrame]:
    model = {"sparsity": "sparsity", "single_z": f"{name}_paper", "prior": f"{name}_prior",
             "prior_sd": f"{name}_prior_std", "ES": "energy_score", "mean_of_k": f"{name}_mean_of_k",
             "best_of_k": f"{name}_best_of_k"}
    baselines = {"sparsity": "sparsity", "train_mean": f"train_mean_{name}", "forest": f"conditional_forest_{name}",
                 "ES train_mean": "train_mean_energy_score", "ES forest": "conditional_forest_energy_score",
                 "ES train_sample": "train_sample_energy_score", "ES model": "energy_score"}
    return {ERROR_TABLES[name]: _short(table, model), "baselines": _short(table, baselines)}


def _short(table: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({short: table[long] for short, long in columns.items() if long in table.columns})


class _Progress:
    """One line per evaluation stage, so a long evaluation never looks hung, and the total time at the end."""

    def __init__(self, quiet: bool):
        import time

        self.quiet, self.clock = quiet, time.perf_counter
        self.started = self.clock()

    def __call__(self, stage: str) -> None:
        if not self.quiet:
            print(f"evaluating: {stage} …", flush=True)

    def done(self) -> None:
        if not self.quiet:
            print(f"evaluated in {self.clock() - self.started:.1f} s", flush=True)


def save_tables(tables: dict, out_dir: Path, *, error_name: str) -> dict:
    """<name>.csv for every table, and the error plot (<ERROR_TABLES[error_name]>.png) and adherence plot;
    returns the figure paths."""
    from modules import plotting

    for name, table in tables.items():
        table.to_csv(out_dir / f"{name}.csv", index=False)
    error_table = ERROR_TABLES[error_name]
    figures = {error_table: plotting.plot_error_per_sparsity(tables[error_table], error_name,
                                                              out_dir / f"{error_table}.png")}
    if "adherence" in tables:
        figures["adherence"] = plotting.plot_adherence(tables["adherence"], out_dir / "adherence.png")
    return figures


def publish(out_dir: Path, tables: dict, figures: dict, summary: dict, *, wandb_run, quiet: bool,
            headings: dict[str, str], footer: str = "", printed: Optional[dict[str, pd.DataFrame]] = None) -> None:
    """summary.json, the tables and figures to W&B, and the tables printed under their headings (`printed`: what to
    print instead of a table, or beside the tables, by heading name)."""
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    if wandb_run is not None:
        _log_to_wandb(wandb_run, tables, figures)
    if quiet:
        return
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        shown = {**tables, **(printed or {})}
        for name, heading in headings.items():
            if name in shown:
                print(f"\n{heading}")
                print(shown[name].to_string(index=False))
        print(f"\nwritten to {out_dir}{footer}")


def _log_to_wandb(run, tables: dict, figures: dict) -> None:
    try:
        import wandb

        for name, table in tables.items():
            run.log({f"eval/{name}": wandb.Table(dataframe=table.astype({c: str for c in table.columns[:1]}))})
        for error_table in ERROR_TABLES.values():  # the means over levels as scalars, for comparing runs
            if error_table in tables:
                mean = tables[error_table].iloc[-1]
                run.summary.update({f"eval/{c}_mean": float(mean[c]) for c in mean.index if c != "sparsity"})
        for name, path in figures.items():
            run.log({f"eval/{name}_plot": wandb.Image(str(path))})
    except Exception as err:  # W&B never breaks an evaluation
        print(f"W&B: could not log the evaluation ({err})")

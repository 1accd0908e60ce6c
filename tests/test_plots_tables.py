"""The pictures and tables a new user reads first: `plot_style: auto` and the generic column picture, titled bike
panels, loss curves of one epoch, adherence on separate axes with its counts per level, the errors file named for
what it holds, the prior's spread of a single draw."""
import contextlib
import dataclasses
import io
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from modules import plotting
from modules.conditioning import ConditionSchema
from modules.config import ConditionSpec, DataConfig
from modules.errors import UserError
from modules.evaluation import ERROR_TABLES, error_table_path, evaluate_parametric, mask_draws
from modules.render import DESIGN_COLUMNS as BIKE_COLUMNS
from modules.render import render_bike
from tests.conftest import ROOT


def design_columns(config: str) -> list[str]:
    return yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())["data"]["design_columns"]


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so tqdm draws its bars into it."""

    def isatty(self) -> bool:
        return True


# --------------------------------------------------------------------------- plot_style: auto


def test_auto_plot_style_is_the_default_and_follows_the_columns():
    assert DataConfig(csv_path="x", design_columns=["a"], conditions=[]).plot_style == "auto"
    assert plotting.resolve_plot_style("auto", design_columns("mcvae_biked")) == "bike"
    assert plotting.resolve_plot_style("auto", design_columns("mcvae_cars")) == "points"  # B1_x/B1_y, …
    assert plotting.resolve_plot_style("auto", ["x1", "y1", "xtip", "ytip"]) == "points"
    assert plotting.resolve_plot_style("auto", ["x_a", "y_a", "thickness"]) == "columns"  # one column unpaired
    assert plotting.resolve_plot_style("none", ["x_a", "y_a"]) == "columns"
    assert plotting.resolve_plot_style("profile", design_columns("mcvae_cars")) == "profile"


def test_an_explicit_style_that_cannot_draw_the_columns_is_refused_before_generating():
    with pytest.raises(UserError, match=r"data\.plot_style: points .*no design columns pair up \('width', 'height'\)"):
        plotting.resolve_plot_style("points", ["width", "height"])
    with pytest.raises(UserError, match=r"data\.plot_style: bike .*lack 'x_rear_wheel_center'.*data\.plot_style: auto"):
        plotting.resolve_plot_style("bike", design_columns("mcvae_cars"))
    with pytest.raises(UserError, match="'Wheel diameter front'"):  # one BIKED column short
        plotting.resolve_plot_style("bike", design_columns("mcvae_biked")[:-1])
    with pytest.raises(UserError, match="'sketch' is not a plot style; choose one of auto, bike"):
        plotting.resolve_plot_style("sketch", ["a"])


def test_the_bike_style_needs_exactly_the_columns_the_renderer_reads(biked_frame):
    class Reads(dict):
        def __init__(self, row):
            super().__init__(row)
            self.read = set()

        def __getitem__(self, key):
            self.read.add(key)
            return super().__getitem__(key)

    design = Reads(biked_frame.iloc[0][design_columns("mcvae_biked")].to_dict())
    render_bike(design, {}, size=32)
    assert design.read == set(BIKE_COLUMNS) == set(design_columns("mcvae_biked"))


def test_the_columns_picture_wraps_and_puts_generated_beside_real_on_the_real_scale():
    rng = np.random.default_rng(0)
    columns = [f"p{i}" for i in range(30)]
    real = pd.DataFrame(rng.normal(size=(40, 30)), columns=columns)
    generated = pd.DataFrame(rng.normal(size=(5, 30)), columns=columns).assign(style="road")  # a condition column
    fig = plotting.columns_figure(generated, design_columns=columns, real=real, conditions="style=road")
    axes = fig.axes
    assert len(axes) == math.ceil(30 / plotting.COLUMNS_PER_ROW) == 3
    assert [t.get_text() for ax in axes for t in ax.get_xticklabels()] == columns
    # the generated dots of column p13 (second row, slot 1) sit at (value − real min) / real range
    (dots,) = [line for line in axes[1].lines if len(line.get_xdata()) == 5 and 1 < np.mean(line.get_xdata()) < 2]
    expected = (generated["p13"] - real["p13"].min()) / (real["p13"].max() - real["p13"].min())
    np.testing.assert_allclose(dots.get_ydata(), expected)
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == ["generated (5)", "real designs sharing the conditions (40)"]
    assert fig._suptitle.get_text().startswith("style=road\n") and "real designs' min–max" in fig._suptitle.get_text()

    alone = plotting.columns_figure(generated, design_columns=columns[:3])  # no real designs: their own scale
    assert len(alone.axes) == 1 and [t.get_text() for t in alone.axes[0].get_legend().get_texts()] == ["generated (5)"]
    ys = np.concatenate([line.get_ydata() for line in alone.axes[0].lines])
    assert ys.min() == pytest.approx(0) and ys.max() == pytest.approx(1)
    assert "no real designs given" in alone._suptitle.get_text()


def test_design_grid_draws_columns_it_cannot_pair(tmp_path):
    designs = pd.DataFrame({"span": [1.0, 2.0, 3.0], "chord": [0.2, 0.3, 0.1], "wing": ["a", "a", "a"]})
    path = plotting.design_grid(designs, tmp_path / "w.png", style="auto", design_columns=["span", "chord"],
                                suptitle="wing=a")
    assert path.stat().st_size > 5000
    fig = plotting.design_figure(designs, style="auto", suptitle="wing=a")  # without design_columns: the numbers
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["span", "chord"]


def test_real_designs_sharing_the_conditions(biked_frame):
    specs = [ConditionSpec("BikeStyle", "categorical"), ConditionSpec("Teeth on chainring", "numerical")]
    schema = ConditionSchema.fit(specs, biked_frame)
    teeth = biked_frame["Teeth on chainring"]
    tenth = 0.1 * (teeth.max() - teeth.min())
    like = plotting.real_designs_like(biked_frame, {"BikeStyle": "ROAD", "Teeth on chainring": "50"}, schema)
    expected = (biked_frame["BikeStyle"] == "ROAD") & ((teeth - 50).abs() <= tenth)
    assert len(like) == expected.sum() > 20 and (like.index == biked_frame.index[expected]).all()
    assert len(plotting.real_designs_like(biked_frame, {}, schema)) == len(biked_frame)
    with pytest.raises(UserError, match="'BikeStyle' has no category 'ROADS'"):
        plotting.real_designs_like(biked_frame, {"BikeStyle": "ROADS"}, schema)


# --------------------------------------------------------------------------- titles of bike panels


def test_every_bike_panel_has_its_title(biked_frame):
    designs = biked_frame.head(6)
    titles = [f"#{i}" for i in range(6)]
    fig = plotting.design_figure(designs, style="bike", titles=titles, suptitle="BikeStyle=ROAD")
    assert [ax.get_title() for ax in fig.axes] == titles + ["", ""]  # 2 rows of 4 panels, the last 2 empty
    assert all(ax.images for ax in fig.axes[:6])
    points = plotting.design_figure(pd.DataFrame({"x_a": [0.0, 1.0], "y_a": [1.0, 0.0]}), style="points",
                                    titles=["first", "second"])
    assert [ax.get_title() for ax in points.axes] == ["first", "second"]


# --------------------------------------------------------------------------- training curves, adherence


def test_one_epoch_curves_are_drawn_as_points():
    metrics = pd.DataFrame({"epoch": [0, 0], "step": [0, 1], "train/loss": [2.0, 1.0], "train/kl": [0.5, 0.3],
                            "val/loss": [np.nan, 1.2], "sparsity": [0.1, 0.1]})
    figures = plotting.training_figures(metrics)
    loss = figures["loss"]
    assert [ax.get_title() for ax in loss.axes] == ["loss", "kl"]
    for ax in loss.axes:
        assert ax.lines and all(len(line.get_xdata()) == 1 and line.get_marker() == "o" for line in ax.lines)
    (sparsity,) = figures["sparsity"].axes[0].lines
    assert sparsity.get_marker() == "o" and list(sparsity.get_ydata()) == [0.1]

    long = pd.DataFrame({"epoch": range(50), "train/loss": np.linspace(2, 1, 50)})
    (line,) = plotting.training_figures(long)["loss"].axes[0].lines
    assert line.get_marker() in ("None", None, "")  # a long curve is a plain line


def test_accuracy_and_r2_get_axes_of_their_own_and_few_scored_levels_are_hollow():
    table = pd.DataFrame([
        {"condition": "style", "kind": "categorical", "metric": "accuracy", "majority": 0.4, "real": 0.9,
         "informative": True, "n": 100, "0": 0.8, "0.9": 1.0, "n_0": 100, "n_0.9": 3},
        {"condition": "teeth", "kind": "numerical", "metric": "r2", "majority": 0.0, "real": 0.7,
         "informative": True, "n": 100, "0": 0.5, "0.9": -2.0, "n_0": 100, "n_0.9": 60}])
    fig = plotting.adherence_figure(table)
    accuracy, r2 = fig.axes
    assert accuracy.get_ylabel() == "accuracy (categorical conditions)"
    assert r2.get_ylabel() == "R² (numerical conditions)"
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["style"]
    assert [t.get_text() for t in r2.get_legend().get_texts()] == ["teeth"]
    hollow = [line for line in accuracy.lines if line.get_markerfacecolor() == "white"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [0.9]  # 3 designs scored at 0.9
    assert not [line for line in r2.lines if line.get_markerfacecolor() == "white" and len(line.get_xdata())]


def test_error_plot_takes_a_single_prior_draw():
    table = pd.DataFrame({"sparsity": [0.0, "mean"], "sse_paper": [1.0, 1.0], "sse_prior": [1.1, 1.1],
                          "sse_prior_std": [np.nan, np.nan], "train_mean_sse": [2.0, 2.0]})
    fig = plotting.error_figure(table, "sse")
    (baseline,) = [line for line in fig.axes[0].lines if line.get_label() == "baseline: mean training example"]
    assert baseline.get_marker() == "."  # one level: a line alone would not show


# --------------------------------------------------------------------------- a whole parametric evaluation


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, biked_frame):
    """An untrained mcVAE on 300 BIKED designs, evaluated at two levels with one prior draw, its stdout and its
    stderr (a terminal, so the progress bars are drawn)."""
    from tests.test_baselines import built

    tmp = tmp_path_factory.mktemp("evaluated")
    biked_frame.head(300).to_csv(tmp / "slice.csv", index=False)
    dm, model = built(tmp / "slice.csv")
    cfg = dataclasses.replace(model.cfg.evaluation, sparsity_levels=[0.0, 0.9], samples_per_design=2,
                              prior_draws=1, diversity_groups=2, diversity_samples=2)
    out, err = io.StringIO(), Terminal()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        tables = evaluate_parametric(model, dm, tmp / "eval", cfg=cfg)
    return {"dm": dm, "model": model, "cfg": cfg, "dir": tmp / "eval", "tables": tables, "stdout": out.getvalue(),
            "stderr": err.getvalue()}


def test_the_errors_file_is_named_for_the_sums_of_squares_it_holds(evaluated):
    folder = evaluated["dir"]
    assert ERROR_TABLES["sse"] == "errors_per_sparsity" and ERROR_TABLES["mse"] == "mse_per_sparsity"
    assert (folder / "errors_per_sparsity.csv").is_file() and (folder / "errors_per_sparsity.png").is_file()
    assert not list(folder.glob("mse_per_sparsity.*"))
    assert error_table_path(folder) == folder / "errors_per_sparsity.csv"
    assert "sse_paper" in pd.read_csv(error_table_path(folder)).columns


def test_error_table_path_reads_image_runs_and_older_runs(tmp_path):
    (tmp_path / "mse_per_sparsity.csv").write_text("sparsity\n0.0\n")
    assert error_table_path(tmp_path) == tmp_path / "mse_per_sparsity.csv"
    with pytest.raises(FileNotFoundError, match="neither errors_per_sparsity.csv nor mse_per_sparsity.csv"):
        error_table_path(tmp_path / "nothing")


def test_a_single_prior_draw_has_no_spread(evaluated):
    errors = pd.read_csv(evaluated["dir"] / "errors_per_sparsity.csv")
    assert errors["sse_prior_std"].isna().all() and errors["sse_prior"].notna().all()
    lines = evaluated["stdout"].splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:4] == ["sparsity", "single_z", "prior", "prior_sd"])
    rows = lines[start + 1:start + 4]  # the levels 0 and 0.9, and their mean
    assert [row.split()[0] for row in rows] == ["0.0000", "0.9000", "mean"]
    assert all(row.split()[3] == "NaN" for row in rows)


def test_adherence_counts_the_designs_scored_at_each_level(evaluated):
    model, cfg = evaluated["model"], evaluated["cfg"]
    _, cat, num = evaluated["dm"].tensors["test"]
    table = pd.read_csv(evaluated["dir"] / "adherence.csv").set_index("condition")
    assert {"n", "0", "0.9", "n_0", "n_0.9"} <= set(table.columns)
    uniform = mask_draws(cat, num, cfg)  # masked where U < level; missing conditions are never scored
    tokens = model.masking.mask_tokens
    for j, condition in enumerate(model.schema.categorical):
        if condition.name in table.index:
            known = cat[:, j] != tokens[j]
            assert table.loc[condition.name, "n_0"] == table.loc[condition.name, "n"] == int(known.sum())
            assert table.loc[condition.name, "n_0.9"] == int((known & (uniform[:, j] >= 0.9)).sum())
    for j, condition in enumerate(model.schema.numerical):
        known = ~torch.isnan(num[:, j])
        column = len(model.schema.categorical) + j
        assert table.loc[condition.name, "n_0.9"] == int((known & (uniform[:, column] >= 0.9)).sum())
    assert table["n_0.9"].sum() < table["n_0"].sum() / 4  # at 0.9 few designs are left to score
    printed = evaluated["stdout"].split("Generated designs scored per condition and sparsity")[1].splitlines()
    assert printed[1].split() == ["condition", "0", "0.9"]
    assert "n_0" not in evaluated["stdout"].split("Condition adherence")[1].split("scored per condition")[0]


def test_image_adherence_counts_the_images_scored_at_each_level():
    from modules.config import EvaluationConfig
    from modules.image_adherence import image_adherence
    from tests.test_adherence_measures import Reader, Stub, picture

    cat = torch.tensor([[0], [1], [2], [1], [3], [0]])  # row 4: the rim is missing
    num = torch.tensor([[0.2], [0.5], [float("nan")], [0.4], [0.9], [0.1]])
    images = torch.stack([picture(min(int(k), 2), 0.0) for k in cat[:, 0]])
    cfg = EvaluationConfig(sparsity_levels=[0.0, 0.5])
    table = image_adherence(Stub(follows=True), Reader(), images, cat, num, cfg).set_index("condition")
    uniform = mask_draws(cat, num, cfg)
    known_rim, known_teeth = cat[:, 0] != 3, ~torch.isnan(num[:, 0])
    assert table.loc["rim", "n"] == table.loc["rim", "n_0"] == 5
    assert table.loc["teeth", "n"] == table.loc["teeth", "n_0"] == 5
    assert table.loc["rim", "n_0.5"] == int((known_rim & (uniform[:, 0] >= 0.5)).sum())
    assert table.loc["teeth", "n_0.5"] == int((known_teeth & (uniform[:, 1] >= 0.5)).sum())
    assert list(table.columns[-2:]) == ["n_0", "n_0.5"]  # after the scores, which readers find as [0-9.]+


def test_the_evaluation_names_its_phases_in_progress_bars_on_a_terminal(evaluated):
    bars = evaluated["stderr"].replace("\r", "\n")
    for phase in ("single-z and prior errors", "conditional forest", "2 samples per design", "adherence forests",
                  "adherence of generated designs", "diversity"):
        assert f"{phase}:" in bars, phase
    assert "evaluating: single-z errors …" in evaluated["stdout"]  # the stage lines stay, on stdout
    assert "%|" not in evaluated["stdout"]  # and no bar

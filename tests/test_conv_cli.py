"""train_conv_mcvae.py end to end on a few dozen 32 px renders: run directory, resume, sample.py, evaluate.py."""
import json

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from modules.image_evaluation import LABEL_HEIGHT

import evaluate
import sample
import train_conv_mcvae
from tests.conftest import ROOT, train_on_fresh_renders
from tests.test_cli import expect_error, run_dir_of


def conv_config(tmp_path, images_path, **trainer):
    raw = yaml.safe_load((ROOT / "configs" / "conv_mcvae_biked_small.yaml").read_text())
    raw["data"].update({"images_path": str(images_path), "image_size": 32})
    raw["model"].update({"levels": 2, "attention_levels": [1], "start_channels": 8, "image_embedding_dim": 8,
                         "attention_head_dim": 8})
    raw["trainer"].update({"max_epochs": 2, "batch_size": 16, "num_threads": 1, **trainer})
    raw["evaluation"].update({"prior_draws": 1, "diversity_groups": 2, "diversity_samples": 2})
    raw["sample_grid"].update({"every_n_epochs": 2, "n_real": 4, "per_prompt": 4})
    path = tmp_path / "conv.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory, biked_frame):
    tmp = tmp_path_factory.mktemp("conv")
    run, config = train_on_fresh_renders(tmp, biked_frame, conv_config, train_conv_mcvae.main, name="c")
    return run, config, tmp


def test_run_directory(conv_run):
    run, _, tmp = conv_run
    for name in ["config.yaml", "split.csv", "metrics.csv", "checkpoints/last.ckpt", "plots/loss.png",
                 "eval/mse_per_sparsity.csv", "eval/mse_per_sparsity.png", "eval/diversity.csv", "eval/samples.png",
                 "eval/adherence.csv", "eval/adherence.png",
                 "eval/summary.json"]:
        assert (run / name).is_file(), name
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert "sketches_" in stored["data"]["images_path"]  # rendered on the fly from the parametric CSV
    assert len(list((tmp / "data" / ".cache").glob("sketches_*_32/*.png"))) == 48
    table = pd.read_csv(run / "eval/mse_per_sparsity.csv")
    assert len(table) == 11 and (table["mse_paper"] > 0).all()
    assert table["train_mean_mse"].iloc[0] > 0  # the mean image, one figure for every level
    assert table["train_mean_mse"].to_numpy() == pytest.approx([table["train_mean_mse"].iloc[0]] * 11)
    # the sample-based errors of the parametric models, on pixels (k = samples_per_design of the config)
    for column in ("energy_score", "mse_mean_of_k", "mse_best_of_k", "train_mean_energy_score",
                   "train_sample_energy_score"):
        assert table[column].notna().all() and (table[column] > 0).all(), column
    assert (table["mse_best_of_k"] <= table["mse_prior"] + 1e-9).iloc[:10].all()  # the closest of k beats one draw on average
    adherence = pd.read_csv(run / "eval/adherence.csv")
    assert {"majority", "real", "informative", "n"} <= set(adherence.columns)
    teeth = adherence.set_index("condition").loc["Teeth on chainring"]
    assert teeth["majority"] <= 0.0  # the R² of the training mean on other data
    summary = json.loads((run / "eval/summary.json").read_text())
    assert summary["train_mean_mse"] == pytest.approx(table["train_mean_mse"].iloc[0])
    assert summary["n_images"] == (pd.read_csv(run / "split.csv")["split"] == "test").sum()
    grid = Image.open(run / "eval/samples.png")
    assert grid.size[1] == 4 * (32 + LABEL_HEIGHT) + 3 * 2  # real + three sparsity levels, each labelled
    # training-time grids: real, generated from their conditions, one row per prompt (4 in the config)
    grids = sorted((run / "samples").glob("epoch_*.png"))
    assert [g.name for g in grids] == ["epoch_001.png"]
    assert Image.open(grids[0]).size[1] == 6 * (32 + LABEL_HEIGHT) + 5 * 2


def test_resume_equals_straight(tmp_path, biked_frame):
    from modules.render import render_dataset

    csv = tmp_path / "bikes.csv"
    biked_frame.head(40).to_csv(csv, index=False)
    table = render_dataset(csv, tmp_path / "png", size=32, progress=False)
    config = conv_config(tmp_path, tmp_path / "png", max_epochs=2)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["csv_path"] = str(table)
    raw["sparsity"]["target_at"] = 1
    config.write_text(yaml.safe_dump(raw))
    args = ["--config", str(config), "--no_eval"]
    assert train_conv_mcvae.main([*args, "--logdir", str(tmp_path / "a")]) == 0
    with pytest.warns(UserWarning, match="beyond the end of training"):
        assert train_conv_mcvae.main([*args, "--logdir", str(tmp_path / "b"), "--max_epochs", "1"]) == 0
    run_b = run_dir_of(tmp_path / "b")
    assert train_conv_mcvae.main([*args, "--logdir", str(tmp_path / "b"), "--ckpt_path",
                                  str(run_b / "checkpoints/last.ckpt")]) == 0
    a = torch.load(run_dir_of(tmp_path / "a") / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(run_b / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample_and_evaluate(conv_run, tmp_path, capsys):
    run, _, tmp = conv_run
    ckpt = str(run / "checkpoints/last.ckpt")
    out = tmp_path / "grid.png"
    assert sample.main(["--ckpt", ckpt, "--condition", "BikeStyle=ROAD", "--condition", "RIM_STYLE rear=disc",
                        "--n", "10", "--out", str(out), "--singles", str(tmp_path / "single"), "--seed", "1"]) == 0
    assert Image.open(out).size == (8 * 32 + 7 * 2, 2 * (32 + LABEL_HEIGHT) + 2)
    assert len(list((tmp_path / "single").glob("*.png"))) == 10
    expect_error(capsys, sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "x.csv")]), "PNG grid")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    try:
        assert evaluate.main(["--ckpt", ckpt, "--out", str(tmp_path / "eval")]) == 0
    finally:
        mp.undo()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "eval/mse_per_sparsity.csv"),
                                  pd.read_csv(run / "eval/mse_per_sparsity.csv"))
    # --temperature 0: z is the prior's mean, so the images of one set of conditions are one image
    assert sample.main(["--ckpt", ckpt, "--condition", "BikeStyle=ROAD", "--n", "4", "--out", str(tmp_path / "t0.png"),
                        "--singles", str(tmp_path / "t0"), "--temperature", "0"]) == 0
    singles = [torch.tensor(__import__("numpy").array(Image.open(f))) for f in sorted((tmp_path / "t0").glob("*.png"))]
    # equal up to uint8 rounding: a batched CPU conv may differ per row in the last float bit (AVX2 kernels)
    assert len(singles) == 4 and all((singles[0].int() - other.int()).abs().max() <= 1 for other in singles[1:])
    assert all((singles[0] != other).float().mean() < 0.01 for other in singles[1:])
    mp.chdir(tmp)
    try:
        assert evaluate.main(["--ckpt", ckpt, "--out", str(tmp_path / "eval_t0"), "--temperature", "0"]) == 0
    finally:
        mp.undo()
    diversity = pd.read_csv(tmp_path / "eval_t0/diversity.csv").set_index("comparison")["generated"]
    everything_masked = "all designs (generated: all conditions masked)"
    assert diversity[everything_masked] == pytest.approx(0.0, abs=1e-4)  # one set of conditions: one image
    assert pd.read_csv(run / "eval/diversity.csv").set_index("comparison")["generated"][everything_masked] > 0.1


def test_missing_image_folder(tmp_path, capsys):
    config = conv_config(tmp_path, tmp_path / "nothing_here")
    code = train_conv_mcvae.main(["--config", str(config), "--logdir", str(tmp_path / "l")])
    expect_error(capsys, code, "image folder", "does not exist", "modules.render")


def test_adherence_classifier_learns_rendered_conditions(tmp_path, biked_frame):
    """On real renders the CNN must read the rim style far better than chance (the generated side is model-bound)."""
    from modules.config import ConditionSpec
    from modules.image_adherence import _predict, fit_condition_classifier
    from modules.image_data import ImageDataConfig, ImageDataModule
    from modules.render import render_dataset

    frame = pd.concat([biked_frame[biked_frame["RIM_STYLE rear"] == "disc"].head(40),
                       biked_frame[biked_frame["RIM_STYLE rear"] == "spoked"].head(40)])
    frame.to_csv(tmp_path / "b.csv", index=False)
    table = render_dataset(tmp_path / "b.csv", tmp_path / "png", size=32, progress=False)
    cfg = ImageDataConfig(images_path=str(tmp_path / "png"), csv_path=str(table), id_column="Bike index",
                          conditions=[ConditionSpec("RIM_STYLE rear", "categorical")], image_size=32)
    dm = ImageDataModule(cfg, batch_size=16, progress=False)
    from modules.image_data import to_model_range

    images, cat, num = dm.tensors["train"]
    classifier = fit_condition_classifier(to_model_range(images, "minus_one_one"), cat, num, dm.schema, epochs=15)
    test_images, test_cat, _ = dm.tensors["test"]
    predicted, _ = _predict(classifier, to_model_range(test_images, "minus_one_one"))
    assert (predicted[:, 0] == test_cat[:, 0]).float().mean() >= 0.85


def test_a_tiny_conv_mcvae_generates_the_rear_rim_it_is_asked_for(tmp_path, biked_frame):
    """Smoke level of the adherence target: a few hundred steps on 80 renders (disc / spoked rear wheels) at 32 px,
    and the adherence CNN, trained on the real renders, reads the asked-for rim in the generated images at s = 0
    well above the majority class."""
    from modules.config import ConditionSpec, EvaluationConfig, SplitConfig, build_dataclass, to_dict
    from modules.conv_mcvae import ConvMCVAE, ConvMCVAERunConfig
    from modules.image_adherence import fit_condition_classifier, image_adherence
    from modules.image_data import ImageDataConfig, ImageDataModule, to_model_range
    from modules.render import render_dataset

    frame = pd.concat([biked_frame[biked_frame["RIM_STYLE rear"] == "disc"].head(40),
                       biked_frame[biked_frame["RIM_STYLE rear"] == "spoked"].head(40)])
    frame.to_csv(tmp_path / "b.csv", index=False)
    table = render_dataset(tmp_path / "b.csv", tmp_path / "png", size=32, progress=False)
    data = ImageDataConfig(images_path=str(tmp_path / "png"), csv_path=str(table), id_column="Bike index",
                           conditions=[ConditionSpec("RIM_STYLE rear", "categorical")], image_size=32,
                           split=SplitConfig(train=0.75, val=0.0, test=0.25, seed=0))
    dm = ImageDataModule(data, batch_size=16, progress=False)
    small = yaml.safe_load((ROOT / "configs" / "conv_mcvae_biked_small.yaml").read_text())["model"]
    raw = {"model_type": "conv_mcvae", "data": to_dict(data),
           "model": {**small, "levels": 2, "attention_levels": [1], "start_channels": 8, "image_embedding_dim": 8,
                     "attention_head_dim": 8}}
    cfg = build_dataclass(ConvMCVAERunConfig, raw, source="test")
    torch.manual_seed(0)
    model = ConvMCVAE(config=to_dict(cfg), schema=dm.schema.state_dict())
    images, cat, num = dm.tensors["train"]
    images = to_model_range(images, "minus_one_one")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(300):
        idx = torch.randint(len(images), (16,), generator=g)
        loss = model._step((images[idx], cat[idx], num[idx]), 0.1, torch.Generator().manual_seed(step))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if model.ema is not None:  # the shipped config samples with the weight average, as training keeps it
            model.ema.update(model._averaged_parameters())
    model.eval()
    classifier = fit_condition_classifier(images, cat, num, dm.schema, epochs=15)
    test_images, test_cat, test_num = dm.tensors["test"]
    scores = image_adherence(model, classifier, to_model_range(test_images, "minus_one_one"), test_cat, test_num,
                             EvaluationConfig(sparsity_levels=[0.0, 1.0]), train_cat=cat, train_num=num)
    rim = scores.set_index("condition").loc["RIM_STYLE rear"]
    assert rim["real"] >= 0.85 and rim["majority"] <= 0.6
    assert rim["0"] >= 0.8, scores.to_string()  # generated from the asked-for rim


def test_conditions_csv_gives_an_image_model_one_labelled_row_per_request(conv_run, tmp_path):
    run, _, _ = conv_run
    requests = tmp_path / "requests.csv"
    requests.write_text("BikeStyle,RIM_STYLE rear\nROAD,disc\n,\n")
    out = tmp_path / "requests.png"
    assert sample.main(["--ckpt", str(run / "checkpoints/last.ckpt"), "--conditions_csv", str(requests), "--n", "3",
                        "--out", str(out), "--singles", str(tmp_path / "single")]) == 0
    assert Image.open(out).size == (3 * 32 + 2 * 2, 2 * (32 + LABEL_HEIGHT) + 2)  # two rows of three
    assert len(list((tmp_path / "single").glob("*.png"))) == 6


def test_the_prior_probe_scores_each_source_of_z(conv_run, tmp_path):
    import benchmarks.prior_probe_conv_mcvae as probe_script
    from modules.registry import spec_for
    from modules.training import read_checkpoint

    run, _, tmp = conv_run
    ckpt = run / "checkpoints/last.ckpt"
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    try:
        checkpoint = read_checkpoint(ckpt)
        dm, model = spec_for(checkpoint, str(ckpt)).load(checkpoint, None)
        table = probe_script.probe(model, dm, k=3, seed=0).set_index("z_from")
        assert probe_script.main(["--ckpt", str(ckpt), "--k", "3", "--out", str(tmp_path / "probe.csv")]) == 0
    finally:
        mp.undo()
    assert list(table.index) == ["prior", "same_conditions", "any_training", "real training images, same conditions",
                                 "mean training image"]
    # one sample's error = the mean of k's + the samples' spread (a bias-variance identity, exact per pixel)
    assert table["one_sample"].to_numpy() == pytest.approx((table["mean_of_k"] + table["spread"]).to_numpy(), rel=1e-5)
    assert (table["spread"].drop("mean training image") > 0).all()
    raw, _, _ = dm.split_images("train")
    from modules.image_data import to_model_range

    x = to_model_range(dm.split_images("test")[0], dm.cfg.value_range)
    assert table.loc["mean training image", "one_sample"] == pytest.approx(
        float((to_model_range(raw, dm.cfg.value_range).mean(0, keepdim=True) - x).pow(2).mean()), rel=1e-5)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "probe.csv").set_index("z_from"), table, rtol=1e-5)
    # the same-condition rows share every categorical condition with their test row
    train_cat = torch.tensor([[0, 1], [0, 2], [1, 1], [0, 1]])
    rows = probe_script.same_condition_rows(train_cat, torch.tensor([[0, 1], [1, 1], [2, 2]]))
    assert [r.tolist() for r in rows] == [[0, 3], [2], [0, 1, 2, 3]]  # no match: every row

"""train_first_stage.py end to end on 40 renders at 32 px: run directory, export, evaluation, exact resume."""
import json

import pytest
import torch
import yaml
from PIL import Image

from modules.image_evaluation import LABEL_HEIGHT

import train_first_stage
from tests.conftest import ROOT
from tests.test_cli import expect_error, run_dir_of


@pytest.fixture(scope="module")
def setup(tmp_path_factory, biked_frame):
    from modules.render import render_dataset

    tmp = tmp_path_factory.mktemp("first_stage")
    biked_frame.head(40).to_csv(tmp / "bikes.csv", index=False)
    table = render_dataset(tmp / "bikes.csv", tmp / "png", size=32, progress=False)
    raw = yaml.safe_load((ROOT / "configs" / "first_stage_biked_small.yaml").read_text())
    raw["data"].update({"images_path": str(tmp / "png"), "csv_path": str(table), "image_size": 32})
    raw["autoencoder"].update({"block_out_channels": [16, 32], "norm_num_groups": 8})  # factor 2: 16×16×4 latents
    raw["discriminator"].update({"enabled": True, "start_epoch": 0, "layers": 1, "channels": 8})
    raw["trainer"].update({"max_epochs": 1, "batch_size": 8, "num_threads": 1})
    raw["sample_grid"].update({"n_images": 4})
    raw["export_to"] = str(tmp / "stable" / "fs")
    config = tmp / "first_stage.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp, config


@pytest.fixture(scope="module")
def run(setup):
    tmp, config = setup
    assert train_first_stage.main(["--config", str(config), "--logdir", str(tmp / "logs"), "--name", "fs"]) == 0
    return run_dir_of(tmp / "logs")


def test_run_directory_export_and_evaluation(run):
    from modules.diffusion_components.first_stage import FirstStage, FirstStageConfig

    for name in ["config.yaml", "split.csv", "metrics.csv", "checkpoints/last.ckpt", "plots/loss.png",
                 "samples/epoch_000.png", "first_stage/config.json", "first_stage/first_stage_info.json",
                 "eval/summary.json", "eval/reconstruction.csv", "eval/reconstructions.png"]:
        assert (run / name).is_file(), name
    assert Image.open(run / "samples/epoch_000.png").size == (4 * 32 + 3 * 2, 2 * (32 + LABEL_HEIGHT) + 2)
    summary = json.loads((run / "eval/summary.json").read_text())
    assert summary["n_images"] == 4 and 0 < summary["mse"] < 4 and summary["latent_shape"] == [4, 16, 16]
    info = json.loads((run / "first_stage/first_stage_info.json").read_text())
    stable = run.parent.parent / "stable" / "fs"  # export_to: the same files, for configs to name
    assert sorted(p.name for p in stable.iterdir()) == sorted(p.name for p in (run / "first_stage").iterdir())
    assert json.loads((stable / "first_stage_info.json").read_text()) == info
    first_stage = FirstStage.from_config(FirstStageConfig(pretrained=str(run / "first_stage"), subfolder=None),
                                         source="test")
    assert first_stage.scaling_factor == pytest.approx(info["scaling_factor"])
    assert first_stage.latent_shape(32) == (4, 16, 16) and first_stage.in_channels == 1
    assert first_stage.decode(first_stage.encode(torch.zeros(2, 1, 32, 32)), channels=1).shape == (2, 1, 32, 32)


def test_resume(run, setup, capsys):
    tmp, config = setup
    first = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert first["epoch"] == 0
    code = train_first_stage.main(["--config", str(config), "--ckpt_path", str(run / "checkpoints/last.ckpt"),
                                   "--max_epochs", "2", "--no_eval"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"first stage exported to {run / 'first_stage'} and {tmp / 'stable' / 'fs'}" in out
    assert f"first_stage: {{pretrained: {tmp / 'stable' / 'fs'}, subfolder: null}}" in out
    resumed = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] > first["global_step"]
    assert json.loads((run / "first_stage/first_stage_info.json").read_text())["epochs"] == 2
    # the same as two epochs straight (posterior noise and batches are seeded by step and epoch)
    assert train_first_stage.main(["--config", str(config), "--logdir", str(tmp / "straight"), "--max_epochs", "2",
                                   "--no_eval"]) == 0
    straight = torch.load(run_dir_of(tmp / "straight") / "checkpoints/last.ckpt", weights_only=True)
    assert all(torch.equal(straight["state_dict"][k], resumed["state_dict"][k]) for k in straight["state_dict"])


def test_resume_refuses_another_autoencoder(run, setup, tmp_path, capsys):
    _, config = setup
    raw = yaml.safe_load(config.read_text())
    raw["autoencoder"]["latent_channels"] = 8
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    code = train_first_stage.main(["--config", str(other), "--ckpt_path", str(run / "checkpoints/last.ckpt"),
                                   "--max_epochs", "3"])
    expect_error(capsys, code, "autoencoder.latent_channels")

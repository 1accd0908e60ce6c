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


# --------------------------------------------------------------------------- export rules


def _snapshot(folder):
    """Content hash and mtime of every file: "untouched" means both equal."""
    import hashlib

    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_readable(folder):
    """Files 644, folders 755 (the folder itself included)."""
    import stat

    for path in [folder, *folder.rglob("*")]:
        expected = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))


@pytest.fixture(scope="module")
def two_epochs(setup, run):
    """A config of 2 epochs without the discriminator, and an existing export at its export_to (a copy of the
    module's run's, as a first `train_first_stage.py` would have left it)."""
    import shutil

    tmp, config = setup
    raw = yaml.safe_load(config.read_text())
    raw["discriminator"]["enabled"] = False
    raw["trainer"]["max_epochs"] = 2
    raw["sample_grid"]["every_n_epochs"] = 0
    raw["export_to"] = str(tmp / "exports" / "fs2")
    two = tmp / "two_epochs.yaml"
    two.write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(run / "first_stage", tmp / "exports" / "fs2")
    return two, tmp / "exports" / "fs2"


@pytest.fixture
def strict_umask():
    import os

    old = os.umask(0o077)  # files would come out 600 and folders 700 unless the export sets the modes
    yield
    os.umask(old)


@pytest.mark.parametrize("shorter", [["--max_epochs", "1"], ["--set", "trainer.max_epochs=1"]], ids=["flag", "set"])
def test_trial_run_leaves_the_export_alone(two_epochs, tmp_path, capsys, strict_umask, shorter):
    config, export = two_epochs
    before = _snapshot(export)
    assert train_first_stage.main(["--config", str(config), "--logdir", str(tmp_path), *shorter, "--no_eval"]) == 0
    out = capsys.readouterr().out
    assert f"not exported to {export}: --max_epochs 1 is below the config's 2 (trainer.max_epochs); pass --export " \
           "to export anyway" in out, out
    assert _snapshot(export) == before and "replacing" not in out
    run = run_dir_of(tmp_path)
    assert f"first_stage: {{pretrained: {run / 'first_stage'}, subfolder: null}}" in out  # the run's own export
    assert json.loads((run / "first_stage/first_stage_info.json").read_text())["epochs"] == 1
    _assert_readable(run / "first_stage")


def test_export_flag_replaces_saying_so(two_epochs, tmp_path, capsys, strict_umask):
    config, export = two_epochs
    old = json.loads((export / "first_stage_info.json").read_text())
    assert train_first_stage.main(["--config", str(config), "--logdir", str(tmp_path), "--max_epochs", "1",
                                   "--export", "--no_eval"]) == 0
    out = capsys.readouterr().out
    run = run_dir_of(tmp_path)
    assert f"exporting to {export} as --export asks, although --max_epochs 1 is below the config's 2" in out, out
    when = old["exported"].replace("T", " ")
    assert (f"replacing the existing first stage at {export} (trained {when}, {old['epochs']} epochs, run "
            f"{old['run_dir']})") in out, out
    assert f"first_stage: {{pretrained: {export}, subfolder: null}}" in out
    assert json.loads((export / "first_stage_info.json").read_text())["run_dir"] == str(run)
    assert _snapshot(export).keys() == _snapshot(run / "first_stage").keys()
    assert not [p for p in export.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    _assert_readable(export)
    _assert_readable(run / "first_stage")


def test_sigterm_stops_without_exporting(two_epochs, tmp_path, capsys, monkeypatch):
    from modules.first_stage_training import FirstStageModel

    config, export = two_epochs
    before = _snapshot(export)
    train_one = FirstStageModel._train_one

    def preempted(self, images):  # what Lightning's SIGTERM handler records
        self.trainer._signal_connector.received_sigterm = True
        return train_one(self, images)

    monkeypatch.setattr(FirstStageModel, "_train_one", preempted)
    assert train_first_stage.main(["--config", str(config), "--logdir", str(tmp_path), "--no_eval"]) == 143
    out = capsys.readouterr().out
    run = run_dir_of(tmp_path)
    assert (f"not exported to {export}: the run was stopped by SIGTERM in epoch 1 of 2; resume it with --ckpt_path "
            f"{run / 'checkpoints' / 'last.ckpt'}") in out, out
    assert _snapshot(export) == before
    assert (run / "first_stage" / "config.json").is_file()  # the run's own export is always written


def test_fast_dev_run_and_foreign_folders_are_not_exported(setup, tmp_path, capsys):
    """fast_dev_run (Lightning's smoke test) never exports; a folder that is no first stage is never replaced,
    even with export_force."""
    import pytorch_lightning as pl

    from modules.config import build_dataclass
    from modules.first_stage_training import ExportFirstStage, FirstStageRunConfig, build_first_stage

    _, config = setup
    raw = yaml.safe_load(config.read_text())
    raw["discriminator"]["enabled"] = False
    cfg = build_dataclass(FirstStageRunConfig, raw, source="test")
    dm, model = build_first_stage(cfg)
    target = tmp_path / "export"

    def fit(force: bool) -> str:
        trainer = pl.Trainer(fast_dev_run=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False,
                             callbacks=[ExportFirstStage(tmp_path / "run", str(target), force=force)])
        trainer.fit(model, datamodule=dm)
        return capsys.readouterr().out

    out = fit(force=False)
    assert f"not exported to {target}: this is a fast_dev_run" in out and not target.exists()
    assert (tmp_path / "run" / "first_stage" / "config.json").is_file()
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    out = fit(force=True)
    assert f"not exported to {target}: it exists and holds no first stage" in out
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

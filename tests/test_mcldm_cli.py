"""train_mcldm.py end to end with a tiny random AutoencoderKL on 32 px renders: run directory, latent cache,
resume, sample.py and evaluate.py on the checkpoint, and the error when the first-stage weights are missing."""
import json

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from modules.image_evaluation import LABEL_HEIGHT

import evaluate
import sample
import train_mcldm
from modules.diffusion_components.first_stage import TINY_AUTOENCODER_CONFIG
from tests.conftest import ROOT, train_on_fresh_renders
from tests.test_cli import expect_error, run_dir_of


def mcldm_config(tmp_path, images_path, csv_path=None, **trainer):
    raw = yaml.safe_load((ROOT / "configs" / "mcldm_biked_small.yaml").read_text())
    raw["data"].update({"images_path": str(images_path), "image_size": 32})
    if csv_path:
        raw["data"]["csv_path"] = str(csv_path)
    raw["first_stage"] = {"config": TINY_AUTOENCODER_CONFIG}  # random weights, 32 px → 4×16×16
    raw["unet"].update({"start_channels": 8, "channel_mult": [1, 2], "attention_levels": [1],
                        "attention_heads": 2, "attention_head_dim": 8, "time_embedding_dim": 16,
                        "positional_dim": 8})
    raw["diffusion"].update({"timesteps": 50, "sampling_steps": 3})
    raw["trainer"].update({"max_epochs": 2, "batch_size": 8, "accumulate_grad_batches": 2, "num_threads": 1,
                           **trainer})
    raw["evaluation"].update({"prior_draws": 1, "diversity_groups": 2, "diversity_samples": 2, "max_images": 4})
    raw["sample_grid"].update({"every_n_epochs": 2, "n_real": 3, "per_prompt": 3})
    path = tmp_path / "mcldm.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory, biked_frame):
    tmp = tmp_path_factory.mktemp("ldm")
    run, config = train_on_fresh_renders(tmp, biked_frame, mcldm_config, train_mcldm.main, name="l")
    return run, config, tmp


def test_run_directory_and_latent_cache(ldm_run):
    run, _, tmp = ldm_run
    for name in ["config.yaml", "split.csv", "metrics.csv", "checkpoints/last.ckpt", "eval/mse_per_sparsity.csv",
                 "eval/diversity.csv", "eval/samples.png", "eval/adherence.csv", "eval/summary.json",
                 "samples/epoch_001.png", "eval/fid.csv"]:
        assert (run / name).is_file(), name
    assert len(list((tmp / "data" / ".cache").glob("sketches_*_32/.cache/latents_*.safetensors"))) == 1
    table = pd.read_csv(run / "eval/mse_per_sparsity.csv")
    assert list(table["sparsity"]) == ["0.0", "0.5", "0.9", "mean"] and (table["mse_paper"] > 0).all()
    summary = json.loads((run / "eval/summary.json").read_text())
    assert summary["n_images"] == 4  # evaluation.max_images
    # real | generated from their conditions | one row per prompt (4)
    assert Image.open(run / "samples/epoch_001.png").size[1] == 6 * (32 + LABEL_HEIGHT) + 5 * 2
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert not any(k.startswith("_first_stage") or "autoencoder" in k for k in ckpt["state_dict"])
    assert any(k.startswith("ema.shadow.unet.") for k in ckpt["state_dict"])
    metrics = pd.read_csv(run / "metrics.csv")
    # 48 bikes → 38 training images, batches of 8 → 5 batches, accumulated in pairs → 3 optimizer steps per epoch
    assert metrics["step"].max() == 6


def test_resume_equals_straight(tmp_path, biked_frame):
    from modules.render import render_dataset

    csv = tmp_path / "bikes.csv"
    biked_frame.head(40).to_csv(csv, index=False)
    table = render_dataset(csv, tmp_path / "png", size=32, progress=False)
    config = mcldm_config(tmp_path, tmp_path / "png", csv_path=table)
    raw = yaml.safe_load(config.read_text())
    raw["sparsity"]["target_at"] = 4  # optimizer steps: the same curve for the 1-epoch and the 2-epoch run
    config.write_text(yaml.safe_dump(raw))
    args = ["--config", str(config), "--no_eval"]
    assert train_mcldm.main([*args, "--logdir", str(tmp_path / "a")]) == 0
    assert train_mcldm.main([*args, "--logdir", str(tmp_path / "b"), "--max_epochs", "1"]) == 0
    run_b = run_dir_of(tmp_path / "b")
    assert train_mcldm.main([*args, "--logdir", str(tmp_path / "b"), "--ckpt_path",
                             str(run_b / "checkpoints/last.ckpt")]) == 0
    a = torch.load(run_dir_of(tmp_path / "a") / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(run_b / "checkpoints/last.ckpt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["global_step"] == b["global_step"]


def test_sample_and_evaluate(ldm_run, tmp_path, capsys):
    run, _, tmp = ldm_run
    ckpt = str(run / "checkpoints/last.ckpt")
    out = tmp_path / "grid.png"
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    try:
        assert sample.main(["--ckpt", ckpt, "--condition", "BikeStyle=ROAD", "--n", "4", "--out", str(out),
                            "--seed", "1", "--steps", "2", "--cfg_scale", "2", "--sampler", "ddim"]) == 0
        assert Image.open(out).size == (4 * 32 + 3 * 2, 32 + LABEL_HEIGHT)
        again = tmp_path / "again.png"
        assert sample.main(["--ckpt", ckpt, "--condition", "BikeStyle=ROAD", "--n", "4", "--out", str(again),
                            "--seed", "1", "--steps", "2", "--cfg_scale", "2", "--sampler", "ddim"]) == 0
        assert Image.open(out).tobytes() == Image.open(again).tobytes()  # DDIM η = 0, same seed
        assert evaluate.main(["--ckpt", ckpt, "--out", str(tmp_path / "eval")]) == 0
    finally:
        mp.undo()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "eval/mse_per_sparsity.csv"),
                                  pd.read_csv(run / "eval/mse_per_sparsity.csv"))


def test_missing_first_stage_weights(tmp_path, capsys, biked_frame, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    csv = tmp_path / "bikes.csv"
    biked_frame.head(20).to_csv(csv, index=False)
    monkeypatch.chdir(tmp_path)
    config = mcldm_config(tmp_path, csv)
    raw = yaml.safe_load(config.read_text())
    raw["first_stage"] = {"pretrained": str(tmp_path / "no_vae_here"), "subfolder": None}
    config.write_text(yaml.safe_dump(raw))
    code = train_mcldm.main(["--config", str(config), "--logdir", str(tmp_path / "l")])
    expect_error(capsys, code, "first_stage.pretrained", "no_vae_here")
    raw["first_stage"] = {"pretrained": "stabilityai/stable-diffusion-2-1", "subfolder": "vae"}
    config.write_text(yaml.safe_dump(raw))
    code = train_mcldm.main(["--config", str(config), "--logdir", str(tmp_path / "l")])
    expect_error(capsys, code, "first_stage.pretrained", "local")


def test_sampler_study_scores_every_run_against_the_converged_solution(ldm_run, tmp_path):
    import importlib.util

    run, _, tmp = ldm_run
    spec = importlib.util.spec_from_file_location("samplers_mcldm", ROOT / "benchmarks" / "samplers_mcldm.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    try:
        assert study.main(["--ckpt", str(run / "checkpoints/last.ckpt"), "--images", "4", "--runs",
                           "ddim:6,dpm_solver:3,ddpm:3", "--reference_steps", "6", "--out", str(tmp_path / "s"),
                           "--threads", "1"]) == 0
    finally:
        mp.undo()
    table = pd.read_csv(tmp_path / "s" / "samplers.csv")
    assert list(table["sampler"]) == ["ddim", "dpm_solver", "ddpm", "real images", "mean training image"]
    ddim, dpm, ddpm = table.iloc[0], table.iloc[1], table.iloc[2]
    assert ddim["mse_to_converged"] < 1e-10  # the reference itself, same x_T
    assert dpm["mse_to_converged"] > 0 and pd.isna(ddpm["mse_to_converged"])  # DDPM is stochastic
    assert (table["mse"].iloc[:3] > 0).all() and table["time_vs_first"].iloc[0] == 1.0
    assert (tmp_path / "s" / "samplers.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="sampler:steps"):
        study.parse_runs("heun:10")

"""benchmarks/bench_mcldm.py and benchmarks/gpu_check.sh run end to end on the CPU (--tiny) and report what they
timed: the config's settings per variant, the authors' settings as the reference of the ratios."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_mcldm", ROOT / "benchmarks" / "bench_mcldm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_benchmark_times_the_real_training_step_and_sample(tmp_path, monkeypatch):
    bench = load_bench()
    from modules.mcldm import MCLDM

    calls = {"training_step": 0, "sample": 0}
    original_step, original_sample = MCLDM.training_step, MCLDM.sample

    def training_step(self, batch, batch_idx):
        calls["training_step"] += 1
        assert isinstance(batch, list) and len(batch) == self.cfg.trainer.accumulate_grad_batches
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(MCLDM, "training_step", training_step)
    monkeypatch.setattr(MCLDM, "sample", lambda self, *a, **k: calls.__setitem__("sample", calls["sample"] + 1)
                        or original_sample(self, *a, **k))
    config = tmp_path / "accumulating.yaml"
    text = (ROOT / "configs" / "mcldm_biked_small.yaml").read_text()
    config.write_text(text.replace("accumulate_grad_batches: 1", "accumulate_grad_batches: 2"))
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--device", "cpu", "--config", str(config), "--variants", "eager,authors",
                       "--steps", "2", "--warmup", "1", "--images", "2", "--max_sampling_steps", "2",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["variants"]) == ["authors", "eager"]  # the reference first
    assert calls["training_step"] == 2 * 3  # warm-up + timed optimizer steps, per variant
    assert calls["sample"] >= 2 * 3  # warm-up, timed, output: through the function sample.py calls
    for name, r in report["variants"].items():
        assert r["train_optimizer_steps"] == 3 and r["settings"]["accumulate_grad_batches"] == 2
        assert r["train_samples_per_s"] > 0 and math.isfinite(r["train_loss_last"])
        assert r["ddim50"]["steps"] == 2 and r["ddim50"]["output_dtype"] == "torch.uint8"
        assert r["ddim50"]["output_shape"] == [2, 1, 64, 64]  # decoded images, not latents
        assert r["ddim50"]["decode_seconds"] > 0 and r["ddim50"]["tflop"] > 0
    eager, authors = report["variants"]["eager"], report["variants"]["authors"]
    assert eager["settings"]["deterministic"] is True and eager["train_deterministic"]  # the small config's
    assert authors["settings"]["sampling_precision"] == "32" and not authors["settings"]["channels_last"]
    assert authors["speedup_vs_authors_settings"]["training"] == 1.0
    assert eager["speedup_vs_authors_settings"]["training"] > 0
    assert report["cost"]["parameters"] > 0 and report["cost"]["train_gflop_per_sample"] > 0


def test_the_gpu_configs_settings_reach_the_trainer(tmp_path):
    bench = load_bench()
    import torch

    cfg, _, _ = bench.load_config(bench.parse_args(["--device", "cpu"]))
    assert cfg.trainer.deterministic is False and cfg.sampling.precision == "bf16"  # configs/mcldm_biked.yaml
    from modules.training import trainer_settings

    settings = trainer_settings(cfg.trainer)
    assert settings["deterministic"] is False and settings["benchmark"] is True
    authors = bench.variant_config(cfg, "authors")
    assert authors.trainer.precision == "16-mixed" and authors.trainer.deterministic
    assert bench.variant_config(cfg, "compile").speed.compile and not bench.variant_config(cfg, "eager").speed.compile
    with pytest.raises(ValueError, match="unknown variant"):
        bench.variant_config(cfg, "fast")
    del torch


def test_gpu_check_runs_every_model_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    shared = ROOT / "data" / "first_stages" / "first_stage_biked_small"
    before = shared.stat().st_mtime_ns if shared.exists() else None
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["mcvae_train", "mcvae_sample", "conv_mcvae_train",
                                                   "conv_mcvae_paper_train", "first_stage_train", "mcldm_train", "mcldm_sample", "bench_mcldm"]
    assert all(s["status"] == "ok" for s in report["steps"])
    pictures = {p.name for p in out.glob("*.png")}
    assert pictures == {"mcvae_samples.png", "conv_mcvae_grid.png", "first_stage_reconstructions.png",
                        "mcldm_grid.png", "mcldm_samples.png"}
    assert len(list(out.iterdir())) <= 8  # what the device machine returns
    assert set(report["bench_mcldm"]["variants"]) == {"authors", "eager"}
    assert (shared.stat().st_mtime_ns if shared.exists() else None) == before  # the shared export left alone


def test_bench_conv_mcvae_times_the_variants_against_the_reference(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "benchmarks/bench_conv_mcvae.py", "--configs", "conv_mcvae_biked_small",
                           "--variants", "bf16,reference,channels_last", "--steps", "2", "--warmup", "1", "--batch", "8",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["reference", "bf16", "channels_last"]  # the reference first
    reference = rows[0]
    assert reference["speedup"] == 1.0 and reference["last_loss_rel_diff"] == 0.0
    assert reference["image_size"] == 64 and reference["batch"] == 8 and reference["steps"] == 2
    # the same weights, masks and noise: channels_last is the same maths, bf16 close to it
    assert rows[2]["first_loss_rel_diff"] < 1e-4
    assert 0 < rows[1]["first_loss_rel_diff"] < 0.05
    for row in rows:
        assert row["seconds_per_step"] > 0 and row["speedup"] == pytest.approx(
            reference["seconds_per_step"] / row["seconds_per_step"])

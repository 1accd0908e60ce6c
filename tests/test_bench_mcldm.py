"""benchmarks/bench_mcldm.py runs end to end on the CPU with the tiny UNet and writes its JSON report."""
import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_mcldm", ROOT / "benchmarks" / "bench_mcldm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_benchmark_writes_a_complete_report(tmp_path):
    bench = load_bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--sample_images", "2",
                       "--ddim_steps", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["train_samples_per_s"] > 0 and report["train_step_ms"] > 0
    assert report["sample_images_per_s"] > 0 and report["sample_seconds"] > 0
    assert math.isfinite(report["train_flops_per_step"]) and report["train_flops_per_step"] > 0
    assert math.isfinite(report["sample_flops"]) and report["sample_flops"] > 0
    assert math.isfinite(report["train_loss_last"]) and report["sample_finite"]
    assert report["parameters"] > 0
    assert report["train_mfu"] is None and report["peak_tflops"] is None  # no MFU on the CPU
    settings = report["settings"]
    assert settings["device"] == "cpu" and settings["tiny"] and settings["precision"] == "fp32"
    assert settings["batch"] == 32 and settings["steps"] == 2 and settings["warmup"] == 1
    assert settings["sample_images"] == 2 and settings["ddim_steps"] == 2 and settings["cfg_scale"] == 1.0
    assert settings["latent_shape"] == [4, 16, 16] and not settings["compile"] and not settings["baseline"]


def test_baseline_guidance_wrapper_equals_the_batched_forward():
    import torch

    bench = load_bench()
    unet = torch.nn.Conv2d(4, 4, 1)
    x, t, c = torch.randn(6, 4, 2, 2), torch.arange(6), torch.randn(6, 3)
    batched = unet(x)
    two_pass = bench.TwoPassGuidance(lambda x, t, c: unet(x))(x, t, c)
    torch.testing.assert_close(two_pass, batched)

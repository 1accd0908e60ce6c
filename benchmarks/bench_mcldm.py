"""Benchmark: mcLDM training and sampling speed, timed on the code path a run takes.

Targets on one H100/H200 for the paper UNet (configs/mcldm_biked.yaml, batch 32, 4×64×64 latents): training
≥ 2,000 samples/s (the authors' code: 197/s in 16-mixed); DDIM-50 + classifier-free guidance for 16 images,
decode included, ≤ 0.3 s (the authors: 2.97 s); the config's own sampler at its step count ≤ 0.15 s.

    python benchmarks/bench_mcldm.py                                   # configs/mcldm_biked.yaml as it is
    python benchmarks/bench_mcldm.py --variants authors,eager,compile  # side by side in one process, ratios
    python benchmarks/bench_mcldm.py --tiny --device cpu               # mcldm_biked_small's UNet: CPU / CI check

What runs is what a run runs:
- Training: Lightning's `Trainer.fit` calls the model's own `training_step` (masks, drop-all, noise, loss, backward,
  optimizer, EMA) with the Trainer settings of `modules.training.trainer_settings` (precision, determinism and
  cuDNN benchmark from `trainer.deterministic`), the config's `accumulate_grad_batches` (batches grouped by the
  project's `TensorBatches` loader, as in training), `speed.channels_last`, `speed.compile`, and the
  NaN guard and sparsity callbacks of a run. Batches are random latents and conditions already on the device
  (the data module keeps them there too). Samples/s = timed optimizer steps × batch × accumulation ÷ seconds,
  timed between `cuda.synchronize()` calls after `--warmup` steps (compilation included there).
- Sampling: `model.sample`, the call sample.py, evaluate.py and the sample grids make: EMA weights, guidance in
  one doubled batch, the config's `sampling.precision` and TF32, then the first-stage decode (an AutoencoderKL with
  Stable Diffusion 2.1's architecture and random weights: the same cost as the real one, which cannot be
  downloaded here) and the conversion to uint8. One warm-up call, then the median of `--repeats`; the latent
  sampling and the decode are also timed alone.

Variants (`--variants`, comma-separated; each is the config with):
- `config`: nothing changed;
- `eager` / `compile`: `speed.compile` false / true;
- `authors`: the authors' settings: `trainer.precision: 16-mixed`, `trainer.deterministic: true`, no
  channels_last, no compile, sampling in fp32 without TF32. Run first, it is the reference of the ratios.

FLOPs by `torch.utils.flop_counter` on the meta device (`unet_cost`): MFU = achieved ÷ the device's dense bf16
peak. On the CPU torch uses `--threads` (default 2) threads; CPU figures are a smoke test, not a measurement.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from modules.conditioning import ConditionSchema  # noqa: E402
from modules.config import build_dataclass, read_yaml, to_dict  # noqa: E402
from modules.diffusion_components.first_stage import (SD21_VAE_CONFIG, TINY_AUTOENCODER_CONFIG,  # noqa: E402
                                                      FirstStage, FirstStageConfig)
from modules.diffusion_components.unet import count_parameters, unet_cost  # noqa: E402
from modules.mcldm import MCLDM, MCLDMRunConfig  # noqa: E402

PAPER_CONFIG = ROOT / "configs" / "mcldm_biked.yaml"
SMALL_CONFIG = ROOT / "configs" / "mcldm_biked_small.yaml"
TARGETS = {"train_samples_per_s": 2000.0, "ddim50_seconds": 0.3, "config_sampler_seconds": 0.15}
AUTHORS = {"train_samples_per_s": 197.0, "ddim50_seconds": 2.97}  # the authors' code on an H100, 16-mixed
# dense bf16 tensor-core peaks (TFLOP/s); matched against torch.cuda.get_device_name, first hit wins
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H20", 148.0),
                    ("A100", 312.0)]
VARIANTS = ("config", "eager", "compile", "authors")


# --------------------------------------------------------------------------- model
def synthetic_frame(cfg: MCLDMRunConfig, n: int = 64, seed: int = 0) -> pd.DataFrame:
    """A frame with every condition column of the config: its categories (or 19 made-up ones, BikeStyle's count)
    drawn at random, numbers in [30, 60]."""
    rng = np.random.default_rng(seed)
    columns = {}
    for spec in cfg.data.conditions:
        if spec.kind == "numerical":
            columns[spec.name] = rng.uniform(30.0, 60.0, n)
        else:
            values = (spec.categories or cfg.data.vocabularies.get(spec.vocabulary or spec.name)
                      or [f"c{i}" for i in range(19)])
            columns[spec.name] = [values[i] for i in rng.integers(0, len(values), n)]
    return pd.DataFrame(columns)


def variant_config(base: MCLDMRunConfig, variant: str) -> MCLDMRunConfig:
    cfg = copy.deepcopy(base)
    if variant == "eager":
        cfg.speed.compile = False
    elif variant == "compile":
        cfg.speed.compile = True
    elif variant == "authors":
        cfg.trainer.precision, cfg.trainer.deterministic = "16-mixed", True
        cfg.speed.channels_last, cfg.speed.compile = False, False
        cfg.sampling.precision, cfg.sampling.tf32 = "32", False
    elif variant != "config":
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return cfg


def latent_shape(cfg: MCLDMRunConfig, vae: dict) -> tuple[int, int, int]:
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return vae["latent_channels"], cfg.data.image_size // factor, cfg.data.image_size // factor


def build_model(cfg: MCLDMRunConfig, vae: dict, device: torch.device, seed: int) -> MCLDM:
    schema = ConditionSchema.fit(cfg.data.conditions, synthetic_frame(cfg), fixed_vocabularies=cfg.data.vocabularies,
                                 source="bench_mcldm")
    torch.manual_seed(seed)
    model = MCLDM(config=to_dict(cfg), schema=schema.state_dict(), latent_shape=latent_shape(cfg, vae))
    first_stage = FirstStage.from_config(FirstStageConfig(config=vae, dtype=cfg.first_stage.dtype))
    model.attach_first_stage(first_stage)
    return model.to(device)


# --------------------------------------------------------------------------- training
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(pl.Callback):
    """The time from the end of the `warmup`-th optimizer step to the end of training."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.started = self.stopped = self.warmup_seconds = self.fit_started = self.loss = None

    def on_train_start(self, trainer, module):
        synchronize(self.device)
        self.fit_started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup and self.started is None:
            synchronize(self.device)
            self.started = time.perf_counter()
            self.warmup_seconds = self.started - self.fit_started
        self.loss = outputs

    def on_train_end(self, trainer, module):
        synchronize(self.device)
        self.stopped = time.perf_counter()


def bench_training(model: MCLDM, device: torch.device, steps: int, warmup: int, seed: int) -> dict:
    from modules.data import TensorBatches
    from modules.sparsity import SparsitySchedule, SparsityScheduler
    from modules.training import NonFiniteLossGuard, trainer_settings

    cfg = model.cfg
    t = copy.deepcopy(cfg.trainer)
    t.accelerator, t.devices, t.num_nodes, t.strategy = ("gpu" if device.type == "cuda" else "cpu"), 1, 1, "auto"
    k, batch = t.accumulate_grad_batches, t.batch_size
    n = (steps + warmup) * k * batch
    g = torch.Generator(device=device).manual_seed(seed)
    sizes = torch.tensor([len(model.schema.vocabulary_of(c.name)) for c in model.schema.categorical], device=device)
    latents = torch.randn((n, *model.latent_shape), generator=g, device=device)
    categorical = (torch.rand((n, len(sizes)), generator=g, device=device) * sizes).long()
    numerical = torch.rand((n, len(model.schema.numerical)), generator=g, device=device)
    loader = TensorBatches((latents, categorical, numerical), batch_size=batch, shuffle=True, seed=seed,
                           accumulate=k)
    timer = StepTimer(warmup, device)
    callbacks = [SparsityScheduler(SparsitySchedule.from_config(cfg.sparsity)), NonFiniteLossGuard(), timer]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(max_steps=steps + warmup, max_epochs=1, **trainer_settings(t), logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(model, train_dataloaders=loader)
    seconds = timer.stopped - timer.started
    loss = timer.loss["loss"] if isinstance(timer.loss, dict) else timer.loss
    return {"train_samples_per_s": steps * k * batch / seconds, "train_step_ms": 1000 * seconds / steps,
            "train_warmup_s": timer.warmup_seconds, "train_loss_last": float(loss),
            "train_optimizer_steps": int(model.global_step), "train_precision": trainer.precision,
            "train_deterministic": bool(torch.are_deterministic_algorithms_enabled()),
            "train_cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


# --------------------------------------------------------------------------- sampling
def bench_sampling(model: MCLDM, *, sampler: str, steps: int, cfg_scale: float, images: int, repeats: int,
                   device: torch.device) -> dict:
    """`model.sample` (latents, decode, uint8) for `images` requests; the median of `repeats` after one warm-up."""
    model.eval()
    model.set_sampling(sampler=sampler, steps=steps, cfg_scale=cfg_scale)
    prompts = synthetic_frame(model.cfg, n=images, seed=1)

    def timed(fn) -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    warmup = timed(lambda: model.sample(prompts, n=1, seed=0))
    seconds = [timed(lambda: model.sample(prompts, n=1, seed=1 + r)) for r in range(repeats)]
    out = model.sample(prompts, n=1, seed=0)
    conditions, _ = model.conditions_from(prompts, 1)
    z = torch.randn((images, *model.latent_shape), generator=torch.Generator().manual_seed(0)).to(device)
    latents_s = statistics.median(timed(lambda: model.generate_latents(conditions, z)) for _ in range(repeats))
    latents = model.generate_latents(conditions, z)
    decode_s = statistics.median(timed(lambda: model.decode_latents(latents)) for _ in range(repeats))
    median = statistics.median(seconds)
    return {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "images": images, "seconds": median,
            "seconds_all": seconds, "warmup_s": warmup, "latents_seconds": latents_s, "decode_seconds": decode_s,
            "images_per_s": images / median, "output_shape": list(out.shape), "output_dtype": str(out.dtype)}


# --------------------------------------------------------------------------- report
def peak_tflops(device: torch.device, given: Optional[float]) -> tuple[Optional[float], str]:
    if given:
        return given, "--peak_tflops"
    if device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{key} dense bf16"
    return None, f"unknown device '{name}': pass --peak_tflops"


def decode_gflop(vae: dict, latent: tuple[int, int, int]) -> float:
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), torch.no_grad():
        autoencoder = AutoencoderKL(**vae)
        with FlopCounterMode(display=False) as counter:
            autoencoder.decode(torch.zeros(1, *latent))
    return counter.get_total_flops() / 1e9


def run_variant(name: str, base: MCLDMRunConfig, vae: dict, args, cost: dict) -> dict:
    cfg = variant_config(base, name)
    if args.device.type == "cpu" and cfg.trainer.precision == "16-mixed":
        cfg.trainer.precision = "32-true"  # fp16 autocast on a CPU times nothing a user runs
    model = build_model(cfg, vae, args.device, args.seed)
    settings = {"precision": cfg.trainer.precision, "accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
                "batch_size": cfg.trainer.batch_size, "channels_last": cfg.speed.channels_last,
                "compile": cfg.speed.compile, "compile_mode": cfg.speed.compile_mode if cfg.speed.compile else None,
                "deterministic": cfg.trainer.deterministic, "sampling_precision": cfg.sampling.precision,
                "sampling_tf32": cfg.sampling.tf32, "first_stage_dtype": cfg.first_stage.dtype,
                "ema": cfg.ema_decay is not None, "generation_batch_size": cfg.speed.generation_batch_size}
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
    result: dict = {"settings": settings}
    if not args.skip_train:
        print(f"[{name}] training: {args.warmup} warm-up + {args.steps} timed optimizer steps", flush=True)
        result.update(bench_training(model, args.device, args.steps, args.warmup, args.seed))
        result["train_tflops_per_s"] = result["train_samples_per_s"] * cost["train_gflop_per_sample"] / 1e3
    if not args.skip_sample:
        runs = {"ddim50": ("ddim", 50)}
        if cfg.diffusion.sampler != "ddim" or cfg.diffusion.sampling_steps != 50:
            runs["config_sampler"] = (cfg.diffusion.sampler, cfg.diffusion.sampling_steps)
        for key, (sampler, steps) in runs.items():
            steps = min(steps, args.max_sampling_steps) if args.max_sampling_steps else steps
            print(f"[{name}] sampling: {sampler}-{steps}, guidance {args.cfg_scale}, {args.images} images, decode "
                  "included", flush=True)
            r = bench_sampling(model, sampler=sampler, steps=steps, cfg_scale=args.cfg_scale, images=args.images,
                               repeats=args.repeats, device=args.device)
            passes = 2 if args.cfg_scale > 0 else 1
            unet_flops = cost["forward_gflop_per_sample"] * passes * args.images * steps
            r["tflop"] = (unet_flops + cost["decode_gflop_per_image"] * args.images) / 1e3
            r["tflops_per_s"] = r["tflop"] / r["seconds"]
            result[key] = r
    del model
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="an mcLDM config (default configs/mcldm_biked.yaml; --tiny: mcldm_biked_small)")
    p.add_argument("--variants", default="config", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true",
                   help="mcldm_biked_small's UNet, 64 px (16×16 latents), a tiny first stage, few steps (CPU / CI)")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default 30 on GPU, 2 with --tiny)")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps first, compile included (default 10 / 1)")
    p.add_argument("--batch", type=int, help="training batch size (default: the config's)")
    p.add_argument("--images", type=int, default=16, help="images per sampling call")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="guidance scale; > 0 doubles the sampling batch")
    p.add_argument("--repeats", type=int, help="timed sampling calls (default 3, 1 with --tiny)")
    p.add_argument("--max_sampling_steps", type=int, help="cap the sampling steps (CPU smoke tests)")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_sample", action="store_true")
    p.add_argument("--peak_tflops", type=float, help="device peak for MFU (default: looked up by device name)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report to this file (after every variant)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here; use --device cpu")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if "authors" in args.variants:  # the reference runs first
        args.variants = ["authors"] + [v for v in args.variants if v != "authors"]
    args.steps = args.steps or (2 if args.tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 10)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    return args


def load_config(args) -> tuple[MCLDMRunConfig, str, dict]:
    path = Path(args.config) if args.config else (SMALL_CONFIG if args.tiny else PAPER_CONFIG)
    cfg = build_dataclass(MCLDMRunConfig, read_yaml(path), source=str(path))
    if args.batch:
        cfg.trainer.batch_size = args.batch
    if args.tiny:
        cfg.data.image_size = 64
        cfg.trainer.batch_size = args.batch or 8
        cfg.trainer.precision = "32-true"
        cfg.speed.generation_batch_size = 64
        vae = dict(TINY_AUTOENCODER_CONFIG, block_out_channels=[32, 32, 32], layers_per_block=1,
                   down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
    else:
        vae = dict(SD21_VAE_CONFIG)
    return cfg, str(path), vae


def main(argv=None) -> int:
    import logging

    from modules.training import quiet_lightning

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    base, source, vae = load_config(args)
    shape = latent_shape(base, vae)
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    probe = build_model(base, vae, torch.device("cpu"), args.seed)
    condition_dim = probe.embedding.out_dim
    parameters = count_parameters(probe.generative_modules())
    del probe
    cost = unet_cost(base.unet, latent_shape=shape, condition_dim=condition_dim)
    cost["decode_gflop_per_image"] = decode_gflop(vae, shape)
    peak, peak_source = peak_tflops(args.device, args.peak_tflops)
    print(f"mcLDM speed benchmark on {device_name}, torch {torch.__version__}; {source}: {base.unet.layout} UNet, "
          f"{cost['parameters'] / 1e6:.1f} M parameters, {cost['train_gflop_per_sample']:.1f} GFLOP per training "
          f"sample, latents {'×'.join(map(str, shape))}, decode {cost['decode_gflop_per_image']:.0f} GFLOP/image",
          flush=True)
    report = {"device_name": device_name, "torch": torch.__version__, "config": source, "tiny": args.tiny,
              "parameters": parameters, "latent_shape": list(shape), "cost": cost, "peak_tflops": peak,
              "peak_source": peak_source, "targets": TARGETS, "authors_h100": AUTHORS,
              "steps": args.steps, "warmup": args.warmup, "images": args.images, "cfg_scale": args.cfg_scale,
              "variants": {}}

    def write():
        report["total_seconds"] = time.perf_counter() - started
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2))

    for name in args.variants:
        result = run_variant(name, base, vae, args, cost)
        if peak and "train_tflops_per_s" in result:
            result["train_mfu"] = result["train_tflops_per_s"] / peak
        report["variants"][name] = result
        write()
    reference = report["variants"].get("authors")
    if reference:
        for name, result in report["variants"].items():
            ratios = {}
            if "train_samples_per_s" in result:
                ratios["training"] = result["train_samples_per_s"] / reference["train_samples_per_s"]
            if "ddim50" in result and "ddim50" in reference:
                ratios["ddim50"] = reference["ddim50"]["seconds"] / result["ddim50"]["seconds"]
            result["speedup_vs_authors_settings"] = ratios
    write()
    print_table(report)
    if args.json:
        print(f"written to {args.json}")
    return 0


def print_table(report: dict) -> None:
    rows = [("", *report["variants"].keys())]

    def row(label, fn):
        values = []
        for result in report["variants"].values():
            try:
                values.append(fn(result))
            except (KeyError, TypeError):
                values.append("—")
        rows.append((label, *values))

    row("training samples/s", lambda r: f"{r['train_samples_per_s']:,.1f}")
    row("training step", lambda r: f"{r['train_step_ms']:.1f} ms")
    row("training TFLOP/s", lambda r: f"{r['train_tflops_per_s']:.1f}")
    row("training MFU", lambda r: f"{r['train_mfu']:.1%}")
    row("warm-up", lambda r: f"{r['train_warmup_s']:.1f} s")
    row("DDIM-50 + CFG, decode incl.", lambda r: f"{r['ddim50']['seconds']:.3f} s")
    row("  of which latents / decode", lambda r: f"{r['ddim50']['latents_seconds']:.3f} / "
                                                 f"{r['ddim50']['decode_seconds']:.3f} s")
    row("config sampler", lambda r: f"{r['config_sampler']['sampler']}-{r['config_sampler']['steps']}: "
                                    f"{r['config_sampler']['seconds']:.3f} s")
    row("× authors' settings (train, DDIM)", lambda r: " / ".join(
        f"{v:.2f}×" for v in r["speedup_vs_authors_settings"].values()))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    t = report["targets"]
    print(f"targets (paper UNet, one H100/H200): ≥ {t['train_samples_per_s']:,.0f} samples/s; DDIM-50 + CFG on 16 "
          f"images ≤ {t['ddim50_seconds']} s; the config's sampler ≤ {t['config_sampler_seconds']} s. The authors: "
          f"{report['authors_h100']['train_samples_per_s']:.0f} samples/s, {report['authors_h100']['ddim50_seconds']} s")
    print(f"total {report['total_seconds']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: mcLDM training and sampling speed (issue: ≥ 2,000 training samples/s at batch 32 and ≤ 0.3 s for
DDIM-50 + classifier-free guidance on 16 images, on an H100; the authors: 197 samples/s with 16-mixed, 2.97 s).

    python benchmarks/bench_mcldm.py                              # the paper UNet, bf16, channels_last, eager
    python benchmarks/bench_mcldm.py --compile                    # + torch.compile (training and sampling UNet)
    python benchmarks/bench_mcldm.py --baseline                   # approximation of the authors' settings
    python benchmarks/bench_mcldm.py --tiny --device cpu          # small UNet, 16×16 latents: CPU / CI smoke test

Model: a real `modules.mcldm.MCLDM` with the paper's `mcldm_biked` UNet (configs/mcldm_biked.yaml when that file
exists, else the `UNetConfig()` defaults, ≈ 115 M parameters), 4×64×64 latents, and a condition schema fitted on a
small synthetic frame with BIKED's 8 conditions (7 categorical, 1 numerical). No first stage is attached: training
runs on latents, sampling times latent generation (`MCLDM.generate_latents`, which does not decode).

Training step: the code of the shared loop in modules/base.py `MaskedConditioningModule.training_step` for one
batch, without the Lightning trainer: `model._step(batch, p, generator)` under autocast, backward, the optimizer
step (the model's own `configure_optimizers`: fused AdamW), the EMA update and the cheap epoch-sum bookkeeping.
Batches are random latents and conditions that already live on the device. Timed with `time.perf_counter`, with
`torch.cuda.synchronize()` only before and after the timed loop (never inside a step); the first `--warmup` steps
(and the compilation they trigger) are timed separately. After the timed loop one extra step runs under
`torch.cuda.set_sync_debug_mode("warn")` and the host syncs it makes are counted.

Sampling: `model.generate_latents` with DDIM, `--ddim_steps` steps and guidance scale `--cfg_scale` (> 0: both
branches in one doubled batch) for `--sample_images` images under the same autocast; one untimed warm-up call, then
the median of `--sample_repeats` timed calls.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one eager training step (forward + backward of the model; the
optimizer and EMA are elementwise and not counted) and over one sampling step (× the number of steps), outside the
timed loops. MFU = achieved FLOP/s ÷ the device's dense bf16 peak (`--peak_tflops`, or looked up by device name).

`--baseline` approximates the authors' setup on the same machine: fp16 autocast with a GradScaler (Lightning's
16-mixed), no channels_last, no compile, unfused (foreach) AdamW and classifier-free guidance as two separate forward
passes per step. It is an approximation: the authors' Lightning loop, data loading and logging are not reproduced.
Both use cudnn.benchmark and TF32.

On the CPU (a smoke test, not a measurement) torch uses one thread unless `--threads N`: on a shared, busy CPU
several threads can run 50× slower. The model needs `diffusers` (its beta schedules) wherever it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
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
import torch  # noqa: E402
from torch import nn  # noqa: E402

from modules.conditioning import ConditionSchema, MaskedConditions  # noqa: E402
from modules.config import ConditionSpec, build_dataclass, read_yaml, to_dict  # noqa: E402
from modules.diffusion_components.unet import UNetConfig, count_parameters  # noqa: E402
from modules.image_data import ImageDataConfig  # noqa: E402
from modules.mcldm import MCLDM, MCLDMRunConfig  # noqa: E402

PAPER_CONFIG = ROOT / "configs" / "mcldm_biked.yaml"
TARGETS = {"train_samples_per_s": 2000.0, "sample_seconds": 0.3}  # H100, batch 32 / DDIM-50 + CFG on 16 images
AUTHORS = {"train_samples_per_s": 197.0, "sample_seconds": 2.97}  # the authors' code, 16-mixed
# dense bf16 tensor-core peaks (TFLOP/s); matched against torch.cuda.get_device_name, first hit wins
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H20", 148.0),
                    ("A100", 312.0)]
# BIKED's conditions (configs/mcldm_biked_small.yaml); BikeStyle has 19 styles in the data
BIKED_CONDITIONS = [
    ConditionSpec("BikeStyle", "categorical", categories=[f"style{i}" for i in range(19)]),
    ConditionSpec("Teeth on chainring", "numerical"),
    ConditionSpec("bottle SEATTUBE0 show OHCLASS: True", "categorical", categories=[0, 1]),
    ConditionSpec("bottle DOWNTUBE0 show OHCLASS: True", "categorical", categories=[0, 1]),
    ConditionSpec("frame_size", "categorical", categories=["XS", "S", "M", "L", "XL"]),
    ConditionSpec("RIM_STYLE front", "categorical", vocabulary="rim_style"),
    ConditionSpec("RIM_STYLE rear", "categorical", vocabulary="rim_style"),
    ConditionSpec("Fork type", "categorical", categories=[0, 1, 2]),
]
BIKED_VOCABULARIES = {"rim_style": ["spoked", "trispoke", "disc"]}
TINY_UNET = UNetConfig(start_channels=32, channel_mult=[1, 2, 2], blocks_per_level=1, attention_levels=[2],
                       attention_heads=4, attention_head_dim=32, dropout=0.0)  # configs/mcldm_biked_small.yaml
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


# --------------------------------------------------------------------------- model
def synthetic_frame(specs: list[ConditionSpec], vocabularies: dict, n: int = 64, seed: int = 0) -> pd.DataFrame:
    """A frame with every condition column: listed categories (or c0…c9) drawn at random, numbers in [30, 60]."""
    rng = np.random.default_rng(seed)
    columns = {}
    for spec in specs:
        if spec.kind == "numerical":
            columns[spec.name] = rng.uniform(30.0, 60.0, n)
        else:
            values = spec.categories or vocabularies.get(spec.vocabulary or spec.name) or [f"c{i}" for i in range(10)]
            columns[spec.name] = [values[i] for i in rng.integers(0, len(values), n)]
    return pd.DataFrame(columns)


def run_config(args) -> tuple[MCLDMRunConfig, str]:
    """The run config: configs/mcldm_biked.yaml if present (not --tiny), else defaults with BIKED's conditions."""
    if not args.tiny and PAPER_CONFIG.is_file():
        cfg = build_dataclass(MCLDMRunConfig, read_yaml(PAPER_CONFIG), source=str(PAPER_CONFIG))
        source = str(PAPER_CONFIG.relative_to(ROOT))
    else:
        data = ImageDataConfig(images_path="synthetic", csv_path="synthetic", id_column="id",
                               conditions=list(BIKED_CONDITIONS), vocabularies=dict(BIKED_VOCABULARIES))
        cfg = MCLDMRunConfig(model_type="mcldm", data=data,
                             unet=UNetConfig(**vars(TINY_UNET)) if args.tiny else UNetConfig())
        source = "tiny UNet (configs/mcldm_biked_small.yaml's)" if args.tiny else "UNetConfig() defaults"
    cfg.speed.channels_last = args.channels_last
    cfg.speed.compile = False  # switched on after the FLOP count (which runs eagerly)
    cfg.speed.compile_mode = args.compile_mode
    cfg.speed.generation_batch_size = max(cfg.speed.generation_batch_size, args.sample_images)
    cfg.trainer.batch_size = args.batch
    return cfg, source


def build_model(args) -> tuple[MCLDM, str]:
    cfg, source = run_config(args)
    specs, vocabularies = cfg.data.conditions, cfg.data.vocabularies
    schema = ConditionSchema.fit(specs, synthetic_frame(specs, vocabularies), fixed_vocabularies=vocabularies,
                                 source="bench_mcldm")
    torch.manual_seed(args.seed)
    model = MCLDM(config=to_dict(cfg), schema=schema.state_dict(), latent_shape=tuple(args.latent_shape))
    return model.to(args.device), source


def random_batch(model: MCLDM, n: int, device: torch.device, generator: torch.Generator):
    """(latents, categorical codes, normalised numbers) on the device, like a LatentDataModule batch."""
    latents = torch.randn((n, *model.latent_shape), generator=generator, device=device)
    sizes = torch.tensor([len(model.schema.vocabulary_of(c.name)) for c in model.schema.categorical], device=device)
    cat = (torch.rand((n, len(sizes)), generator=generator, device=device) * sizes).long()
    num = torch.rand((n, len(model.schema.numerical)), generator=generator, device=device)
    return latents, cat, num


def random_conditions(model: MCLDM, n: int, device: torch.device, generator: torch.Generator) -> MaskedConditions:
    """n requests with about half of the conditions known."""
    _, cat, num = random_batch(model, n, device, generator)
    cat_mask, num_mask = model.masking.random_masks(cat, num, 0.5, generator)
    return model.masking.apply(cat, num, cat_mask, num_mask)


# --------------------------------------------------------------------------- training
class Trainer:
    """One optimizer step of `MaskedConditioningModule.training_step` (one batch, no accumulation)."""

    def __init__(self, model: MCLDM, args):
        self.model, self.args = model, args
        self.autocast = autocast(args)
        if args.baseline:  # torch's default AdamW (foreach, unfused), as the authors' code
            o = model.cfg.optimizer
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas),
                                               weight_decay=o.weight_decay)
        else:
            optimizer = model.configure_optimizers()  # the training code's own: fused AdamW
            self.optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        # fp16 needs loss scaling (Lightning's 16-mixed uses a GradScaler; its step syncs with the host)
        self.scaler = torch.amp.GradScaler(args.device.type) if args.precision == "fp16" else None
        self.clip = model.cfg.optimizer.gradient_clip_val
        self.step_index = 0

    def batch(self, generator: torch.Generator):
        return random_batch(self.model, self.args.batch, self.args.device, generator)

    def generator(self) -> torch.Generator:
        # like `step_generator`: a fresh generator per optimizer step, seeded by the step
        g = torch.Generator(device=self.args.device)
        g.manual_seed(self.args.seed * 1_000_003 + self.step_index)
        return g

    def forward_backward(self, batch) -> torch.Tensor:
        model = self.model
        with self.autocast:
            out = model._step(batch, model.current_sparsity(), self.generator())
        loss = out["loss"]
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        model.accumulate(out, batch[0].shape[0], stage="train")
        return loss.detach()

    def step(self, batch) -> torch.Tensor:
        model, optimizer = self.model, self.optimizer
        optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(batch)
        if self.clip:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip, foreach=True)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        if model.ema is not None:
            model.ema.update(model._averaged_parameters())
        self.step_index += 1
        return loss


def autocast(args):
    dtype = DTYPES[args.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(args.device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_training_flops(trainer: Trainer, batch) -> int:
    """FLOPs of one eager forward + backward (counted on the device; gradients discarded)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = trainer.model
    with FlopCounterMode(display=False) as counter:
        trainer.forward_backward(batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    model._epoch_sums.clear()
    return int(counter.get_total_flops())


def count_host_syncs(trainer: Trainer, batch) -> tuple[Optional[int], Optional[str]]:
    """Host syncs of one (untimed) training step on CUDA, from torch's sync debug mode."""
    if trainer.args.device.type != "cuda":
        return None, None
    synchronize(trainer.args.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # where in the Python code each sync happened (file:line of the call that synced)
    synced = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
    synchronize(trainer.args.device)
    return len(synced), (", ".join(dict.fromkeys(synced)) if synced else None)


def enable_training_compile(model: MCLDM, on: bool) -> None:
    model.cfg.speed.compile = on
    model._compiled = {}


def bench_training(model: MCLDM, args, notes: list[str]) -> dict:
    model.train()
    trainer = Trainer(model, args)
    data_generator = torch.Generator(device=args.device).manual_seed(args.seed)
    batches = [trainer.batch(data_generator) for _ in range(4)]  # cycled: no data cost inside the timed loop

    flops = count_training_flops(trainer, batches[0])
    enable_training_compile(model, args.compile)
    synchronize(args.device)
    started = time.perf_counter()
    try:
        for i in range(args.warmup):
            trainer.step(batches[i % len(batches)])
        synchronize(args.device)
    except Exception as err:  # noqa: BLE001 — any compile failure: fall back to eager
        if not args.compile:
            raise
        notes.append(f"training compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                     "fell back to eager")
        print(f"note: {notes[-1]}", flush=True)
        torch._dynamo.reset()
        enable_training_compile(model, False)
        for i in range(args.warmup):
            trainer.step(batches[i % len(batches)])
        synchronize(args.device)
    warmup_seconds = time.perf_counter() - started

    synchronize(args.device)
    started = time.perf_counter()
    for i in range(args.steps):
        loss = trainer.step(batches[i % len(batches)])
    synchronize(args.device)
    seconds = time.perf_counter() - started

    try:
        syncs, sites = count_host_syncs(trainer, batches[0])
    except Exception as err:  # noqa: BLE001 — a diagnostic only: never lose the timings for it
        syncs, sites = None, f"not counted ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    final_loss = float(loss)
    model._epoch_sums.clear()
    step_s = seconds / args.steps
    return {"train_samples_per_s": args.batch / step_s, "train_step_ms": 1000 * step_s,
            "train_warmup_s": warmup_seconds, "train_loss_last": final_loss,
            "train_flops_per_step": flops, "train_tflops_per_s": flops / step_s / 1e12,
            "train_compiled": bool(model.cfg.speed.compile), "host_syncs_per_step": syncs,
            "host_sync_sites": sites}


# --------------------------------------------------------------------------- sampling
class TwoPassGuidance(nn.Module):
    """The UNet called once per guidance branch (the authors' CFG) when `guided` hands it a doubled batch."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, condition):
        half = x.shape[0] // 2
        return torch.cat([self.unet(x[:half], t[:half], condition[:half]),
                          self.unet(x[half:], t[half:], condition[half:])])


@contextlib.contextmanager
def sampling_unet(model: MCLDM, module: nn.Module):
    """Temporarily let `generate_latents` call `module` instead of its (EMA) UNet."""
    parts = model.ema.shadow if model.ema is not None else None
    if parts is None:
        original = model.unet
        model.unet = module
    else:
        original = parts["unet"]
        parts["unet"] = module
    try:
        yield
    finally:
        if parts is None:
            model.unet = original
        else:
            parts["unet"] = original


def _sampler_unet(model: MCLDM) -> nn.Module:
    return model.ema.shadow["unet"] if model.ema is not None else model.unet


def bench_sampling(model: MCLDM, args, notes: list[str]) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    enable_training_compile(model, False)  # this benchmark compiles the sampling UNet itself (with or without CFG)
    model.set_sampling(sampler="ddim", steps=args.ddim_steps, eta=0.0, cfg_scale=args.cfg_scale)
    g = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    conditions = random_conditions(model, args.sample_images, args.device, g)
    z = torch.randn((args.sample_images, *model.latent_shape), generator=g, device=args.device)
    unet = _sampler_unet(model)
    eager = TwoPassGuidance(unet) if args.baseline and args.cfg_scale > 0 else unet

    def generate():
        with autocast(args):
            return model.generate_latents(conditions, z)

    # FLOPs of one sampling step (eager), × the number of steps
    with sampling_unet(model, eager):
        model.set_sampling(steps=1)
        with FlopCounterMode(display=False) as counter:
            generate()
        flops = int(counter.get_total_flops()) * args.ddim_steps
        model.set_sampling(steps=args.ddim_steps)

    module, compiled = eager, False
    if args.compile:
        module, compiled = torch.compile(eager, mode=args.compile_mode), True
    started = time.perf_counter()
    try:
        with sampling_unet(model, module):
            generate()
            synchronize(args.device)
    except Exception as err:  # noqa: BLE001 — any compile failure: fall back to eager
        if not compiled:
            raise
        notes.append(f"sampling compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                     "fell back to eager")
        print(f"note: {notes[-1]}", flush=True)
        module, compiled = eager, False
        with sampling_unet(model, module):
            generate()
            synchronize(args.device)
    warmup_seconds = time.perf_counter() - started

    times = []
    with sampling_unet(model, module):
        for _ in range(args.sample_repeats):
            synchronize(args.device)
            started = time.perf_counter()
            latents = generate()
            synchronize(args.device)
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {"sample_seconds": seconds, "sample_seconds_all": times, "sample_images_per_s": args.sample_images / seconds,
            "sample_warmup_s": warmup_seconds, "sample_flops": flops, "sample_tflops_per_s": flops / seconds / 1e12,
            "sample_compiled": compiled, "sample_finite": bool(torch.isfinite(latents).all())}


# --------------------------------------------------------------------------- main
def peak_tflops(args) -> tuple[Optional[float], str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak_tflops"
    if args.device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(args.device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{key} dense bf16"
    return None, f"unknown device '{name}': pass --peak_tflops"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small UNet and 4×16×16 latents (CPU / CI)")
    p.add_argument("--batch", type=int, default=32, help="training batch size")
    p.add_argument("--steps", type=int, help="timed training steps (default 50 on GPU, 10 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed training steps first, compile included (default 10 / 2)")
    p.add_argument("--precision", choices=list(DTYPES),
                   help="autocast dtype (default bf16 on GPU, fp16 with --baseline, fp32 on CPU)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC UNet (default on GPU, off on CPU and with --baseline)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (training and sampling)")
    p.add_argument("--compile_mode", choices=["default", "reduce-overhead", "max-autotune",
                                              "max-autotune-no-cudagraphs"], default="default")
    p.add_argument("--sample_images", type=int, default=16)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--cfg_scale", type=float, default=1.0, help="guidance scale; > 0 doubles the sampling batch")
    p.add_argument("--sample_repeats", type=int,
                   help="timed sampling runs, the median is reported (default 3 on GPU, 1 on CPU)")
    p.add_argument("--baseline", action="store_true",
                   help="approximate the authors' settings: fp16 + GradScaler, NCHW, no compile, foreach AdamW, "
                        "CFG as two forward passes")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_sample", action="store_true")
    p.add_argument("--peak_tflops", type=float, help="device peak for MFU (default: looked up by device name)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1 on CPU, where this is a smoke test: "
                                               "several threads on a shared, busy CPU can run 50× slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (use --device cpu)")
    gpu = args.device == "cuda"
    if args.baseline:
        if args.compile:
            p.error("--baseline runs without --compile")
        if args.channels_last:
            p.error("--baseline runs without --channels_last")
        args.channels_last = False
    args.precision = args.precision or (("fp16" if args.baseline else "bf16") if gpu else "fp32")
    args.channels_last = gpu if args.channels_last is None else args.channels_last
    args.steps = args.steps if args.steps is not None else (50 if gpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    args.sample_repeats = args.sample_repeats if args.sample_repeats is not None else (3 if gpu else 1)
    for key in ("batch", "steps", "sample_images", "ddim_steps", "sample_repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be ≥ 1")
    if args.warmup < 0 or args.cfg_scale < 0:
        p.error("--warmup and --cfg_scale must be ≥ 0")
    args.device = torch.device(args.device)
    args.latent_shape = (4, 16, 16) if args.tiny else (4, 64, 64)
    return args


def fmt(value, spec: str, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{unit}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads or args.device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    notes: list[str] = []
    started = time.perf_counter()
    model, source = build_model(args)
    parameters = count_parameters(model.generative_modules())
    settings = {"device": str(args.device), "tiny": args.tiny, "model": source, "batch": args.batch,
                "latent_shape": list(args.latent_shape), "steps": args.steps, "warmup": args.warmup,
                "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
                "compile_mode": args.compile_mode if args.compile else None,
                "optimizer": "AdamW (foreach)" if args.baseline else "AdamW (fused)",
                "cfg": ("two forward passes" if args.baseline else "one doubled batch") if args.cfg_scale > 0
                else "off", "sample_images": args.sample_images, "ddim_steps": args.ddim_steps,
                "cfg_scale": args.cfg_scale, "sample_repeats": args.sample_repeats, "baseline": args.baseline,
                "threads": torch.get_num_threads() if args.device.type == "cpu" else None,
                "ema": model.ema is not None}
    print(f"mcLDM speed benchmark on {device_name}, torch {torch.__version__}"
          f"{' — baseline (approximation of the authors settings)' if args.baseline else ''}", flush=True)
    print(f"model: {source}, {parameters / 1e6:.1f} M parameters (UNet + condition embedding), "
          f"latents {'×'.join(map(str, args.latent_shape))}", flush=True)

    def make_report(results: dict) -> dict:
        results = dict(results)
        peak, peak_source = peak_tflops(args)
        for key in ("train", "sample"):
            rate = results.get(f"{key}_tflops_per_s")
            results[f"{key}_mfu"] = rate / peak if peak and rate is not None else None
        # what the targets need at this model's FLOPs (the paper UNet at the targets' settings only)
        if "train_flops_per_step" in results and not args.tiny:
            results["train_tflops_needed_for_target"] = (results["train_flops_per_step"] / args.batch
                                                         * TARGETS["train_samples_per_s"] / 1e12)
        if "sample_flops" in results and not args.tiny and (args.sample_images, args.ddim_steps) == (16, 50) \
                and args.cfg_scale > 0:
            results["sample_tflops_needed_for_target"] = results["sample_flops"] / TARGETS["sample_seconds"] / 1e12
        report = {"device_name": device_name, "torch": torch.__version__, "parameters": parameters,
                  "settings": settings, **results, "peak_tflops": peak, "peak_source": peak_source,
                  "targets_h100": TARGETS, "authors_h100": AUTHORS, "notes": notes,
                  "total_seconds": time.perf_counter() - started}
        if args.json:  # after each part, so a run stopped during the second still leaves the first
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2))
        return report

    results: dict = {}
    if not args.skip_train:
        print(f"training: {args.warmup} warm-up steps{' (compiling)' if args.compile else ''}, then {args.steps} "
              "timed steps", flush=True)
        results.update(bench_training(model, args, notes))
        make_report(results)
    if not args.skip_sample:
        print(f"sampling: one warm-up run{' (compiling)' if args.compile else ''}, then {args.sample_repeats} "
              "timed runs", flush=True)
        results.update(bench_sampling(model, args, notes))
    report = make_report(results)
    peak, peak_source = report["peak_tflops"], report["peak_source"]
    mfu = {key: report[f"{key}_mfu"] for key in ("train", "sample")}

    r = report
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("device", "model")))
    mfu_text = {key: f"MFU {fmt(mfu[key], '.1%')}" + (f" of {peak:.0f} TFLOP/s ({peak_source})" if peak else
                                                      f" ({peak_source})") for key in mfu}
    rows = [("parameters", f"{parameters:,}", "UNet + condition embedding")]
    if "train_samples_per_s" in r:
        rows += [("training samples/s", fmt(r["train_samples_per_s"], ",.1f"),
                  f"target ≥ {TARGETS['train_samples_per_s']:,.0f} (H100), authors {AUTHORS['train_samples_per_s']:.0f}"),
                 ("training step", fmt(r["train_step_ms"], ".2f", " ms"),
                  f"warm-up {r['train_warmup_s']:.1f} s for {args.warmup} steps"
                  f"{', compiled' if r['train_compiled'] else ''}"),
                 ("FLOPs / training step", fmt(r["train_flops_per_step"] / 1e12, ".3f", " TFLOP"),
                  "fwd + bwd" + (f"; the target needs {r['train_tflops_needed_for_target']:.0f} TFLOP/s"
                                 if "train_tflops_needed_for_target" in r else "")),
                 ("achieved (training)", fmt(r["train_tflops_per_s"], ".2f", " TFLOP/s"),
                  mfu_text["train"]),
                 ("host syncs per step", fmt(r["host_syncs_per_step"], "d"), r["host_sync_sites"] or ""),
                 ("last training loss", fmt(r["train_loss_last"], ".4f"), "")]
    if "sample_seconds" in r:
        rows += [(f"DDIM-{args.ddim_steps} on {args.sample_images} images", fmt(r["sample_seconds"], ".3f", " s"),
                  f"target ≤ {TARGETS['sample_seconds']} s (H100, DDIM-50 + CFG, 16 images), authors "
                  f"{AUTHORS['sample_seconds']} s; median of {args.sample_repeats}"),
                 ("sampling images/s", fmt(r["sample_images_per_s"], ",.1f"),
                  f"warm-up {r['sample_warmup_s']:.1f} s{', compiled' if r['sample_compiled'] else ''}"),
                 ("achieved (sampling)", fmt(r["sample_tflops_per_s"], ".2f", " TFLOP/s"),
                  f"{mfu_text['sample']}; {r['sample_flops'] / 1e12:.3f} TFLOP per run"
                  + (f", the target needs {r['sample_tflops_needed_for_target']:.0f} TFLOP/s"
                     if "sample_tflops_needed_for_target" in r else ""))]
    width = max(len(name) for name, _, _ in rows)
    print()
    print(f"{device_name}, torch {torch.__version__}")
    for name, value, comment in rows:
        print(f"{name:<{width}}  {value:>14}  {comment}")
    for note in notes:
        print(f"note: {note}")
    print(f"total {report['total_seconds']:.1f} s")
    if args.json:
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: conv-mcVAE training step on the CPU, and the levers PyTorch offers there, side by side in one process.

    python benchmarks/bench_conv_mcvae.py                       # small + paper config, batch 64, every variant
    python benchmarks/bench_conv_mcvae.py --configs conv_mcvae_biked_small --variants reference,bf16 --steps 10

A step is what `training_step` does for one batch: draw the masks at the current sparsity, embed, encode,
reparameterise, decode, the loss, backward and the AdamW step (`model._step` + the config's optimizer). Batches are
random images of the config's size with the conditions of real BIKED rows, so no rendering is timed.

Variants (each on a fresh model with the same seed; `reference` first, the base of the ratios):
- `reference`: fp32, NCHW, eager, `--threads` threads (the config's trainer.num_threads when not given);
- `channels_last`: NHWC weights and inputs;
- `bf16`: the forward and loss under `torch.autocast("cpu", bfloat16)` (fast where the CPU has AVX512-BF16/AMX);
- `compile`: `torch.compile` of forward + loss (the compile time is reported apart, in the warm-up);
- `threads1`: one intra-op thread;
- combinations joined by `+`, such as `channels_last+compile`.

"Equal results": every variant starts from the same weights and draws the same masks and noise; the table gives
the relative difference of its loss after the timed steps from the reference's, and of its first-step loss.
Time per step: median over the timed steps. Quote ratios, not seconds: machines of one kind differ up to 2×.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("reference", "channels_last", "bf16", "compile", "threads1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="conv_mcvae_biked_small,conv_mcvae_biked", help="configs in configs/ or YAML paths (e.g. an older version of one), comma-separated")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (paper config: a third of them)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, help="intra-op threads (default: the config's trainer.num_threads)")
    p.add_argument("--csv_path", default="data/biked/df_parameters_final.csv", help="rows whose conditions are used")
    p.add_argument("--out", default="benchmarks/results/bench_conv_mcvae.json")
    return p.parse_args(argv)


def build(cfg_name: str, csv_path: str, batch: int):
    """The model of a config (fresh weights, seed 0) and one batch: random images, conditions of real rows."""
    import pandas as pd

    from modules.conditioning import ConditionSchema
    from modules.config import build_dataclass, config_path, read_yaml, to_dict
    from modules.conv_mcvae import ConvMCVAE, ConvMCVAERunConfig, check_conv_mcvae_config

    path = config_path(None, cfg_name) if cfg_name.endswith((".yaml", ".yml")) else config_path(cfg_name, None)
    cfg = build_dataclass(ConvMCVAERunConfig, read_yaml(path), source=str(path))
    check_conv_mcvae_config(cfg, str(path))
    frame = pd.read_csv(csv_path, nrows=2000)
    schema = ConditionSchema.fit(cfg.data.conditions, frame, fixed_vocabularies=cfg.data.vocabularies)
    cat, num = schema.encode(frame.head(batch))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, generator=g) * 2 - 1
    torch.manual_seed(0)
    model = ConvMCVAE(config=to_dict(cfg), schema=schema.state_dict())
    return cfg, model, (images, cat, num)


def run_variant(cfg_name: str, variant: str, args, steps: int) -> dict:
    levers = set(variant.split("+"))
    cfg, model, (images, cat, num) = build(cfg_name, args.csv_path, args.batch)
    threads = 1 if "threads1" in levers else (args.threads or cfg.trainer.num_threads or torch.get_num_threads())
    torch.set_num_threads(threads)
    model.train()
    if "channels_last" in levers:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    p = cfg.sparsity.initial

    def loss_of(step: int) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in levers):
            return model._step((images, cat, num), p, torch.Generator().manual_seed(step))["loss"]

    forward = torch.compile(loss_of) if "compile" in levers else loss_of
    times, losses = [], []
    started = time.perf_counter()
    for step in range(args.warmup + steps):
        t0 = time.perf_counter()
        loss = forward(step)
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step == args.warmup - 1:
            warmup_seconds = time.perf_counter() - started
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"config": cfg_name, "variant": variant, "threads": threads, "batch": args.batch, "steps": steps,
            "parameters": sum(t.numel() for t in model.parameters()), "image_size": cfg.data.image_size,
            "seconds_per_step": statistics.median(times), "warmup_seconds": warmup_seconds,
            "first_loss": losses[0], "last_loss": losses[-1]}


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted({lever for v in variants for lever in v.split("+")} - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if "reference" in variants:  # the base of the ratios runs first
        variants = ["reference"] + [v for v in variants if v != "reference"]
    rows = []
    for cfg_name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        reference = None
        for variant in variants:
            steps = args.steps if "small" in cfg_name else max(2, args.steps // 3)
            row = run_variant(cfg_name, variant, args, steps)
            if variant == "reference":
                reference = row
            if reference is not None:
                row["speedup"] = reference["seconds_per_step"] / row["seconds_per_step"]
                row["first_loss_rel_diff"] = abs(row["first_loss"] - reference["first_loss"]) / abs(reference["first_loss"])
                row["last_loss_rel_diff"] = abs(row["last_loss"] - reference["last_loss"]) / abs(reference["last_loss"])
            rows.append(row)
            print(f"{cfg_name:24s} {variant:14s} {row['seconds_per_step'] * 1000:8.1f} ms/step"
                  + (f"  ×{row['speedup']:.2f}  Δloss first {row['first_loss_rel_diff']:.1e} "
                     f"last {row['last_loss_rel_diff']:.1e}" if "speedup" in row else "")
                  + f"  (warm-up {row['warmup_seconds']:.1f} s, {row['threads']} threads)", flush=True)
    report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "cpu_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None,
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

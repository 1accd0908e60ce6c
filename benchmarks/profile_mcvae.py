"""Where an mcVAE training epoch spends its time: `torch.profiler` over epochs of the real training run
(`train_mcvae.py`'s job, with its callbacks, logging and checkpoints), after warm-up epochs that are not recorded.

    python benchmarks/profile_mcvae.py                                   # mcvae_biked, 5 warm-up + 30 recorded epochs
    python benchmarks/profile_mcvae.py --config mcvae_biked_paper --epochs 50 --top 25 --json profile.json

Prints the operators with the most self CPU time (their share of the recorded wall time, calls per optimizer
step, µs per call) and the split into forward, backward (autograd) and optimizer; writes the same as JSON. The
numbers are for the machine it runs on: compare shares and calls, not microseconds, across machines.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_profiler_callback(warmup: int, epochs: int):
    """A Lightning callback recording epochs [warmup, warmup + epochs) with torch.profiler."""
    import torch
    from pytorch_lightning.callbacks import Callback

    class ProfileEpochs(Callback):
        def __init__(self):
            self.profiler, self.started, self.seconds, self.steps_before = None, None, 0.0, 0

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == warmup:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profiler.__enter__()
                self.steps_before = trainer.global_step
                self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            if self.profiler is not None and trainer.current_epoch == warmup + epochs - 1:
                self.seconds = time.perf_counter() - self.started
                self.profiler.__exit__(None, None, None)
                self.steps = trainer.global_step - self.steps_before

    return ProfileEpochs()


def summarise(profiler, seconds: float, steps: int, top: int) -> dict:
    """The top operators by self CPU time and the forward / backward / optimizer split of the recorded time."""
    events = profiler.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    table = [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
              "share_of_wall": round(e.self_cpu_time_total / 1e6 / seconds, 4),
              "calls_per_step": round(e.count / max(steps, 1), 2),
              "us_per_call": round(e.self_cpu_time_total / max(e.count, 1), 2)} for e in rows]
    backward = sum(e.self_cpu_time_total for e in events if "Backward" in e.key or e.key.startswith("autograd::"))
    optimizer = next((e.cpu_time_total for e in events if e.key.startswith("Optimizer.step")), 0.0)
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    return {"recorded_seconds": round(seconds, 3), "optimizer_steps": steps,
            "ms_per_step": round(seconds * 1e3 / max(steps, 1), 3),
            "aten_calls_per_step": round(calls / max(steps, 1), 1),
            "share_backward_ops": round(backward / total_self, 3),
            "share_optimizer_step": round(optimizer / (seconds * 1e6), 3),
            "profiler_self_over_wall": round(total_self / 1e6 / seconds, 3), "top": table}


def markdown(summary: dict) -> str:
    lines = [f"{summary['optimizer_steps']} optimizer steps in {summary['recorded_seconds']} s "
             f"({summary['ms_per_step']} ms a step, {summary['aten_calls_per_step']} aten calls a step; backward "
             f"ops {summary['share_backward_ops']:.0%} of the operators' self time, `Optimizer.step` "
             f"{summary['share_optimizer_step']:.0%} of the wall time)", "",
             "| operator | self ms | share of wall | calls / step | µs / call |", "|---|---|---|---|---|"]
    lines += [f"| `{r['op']}` | {r['self_ms']} | {r['share_of_wall']:.1%} | {r['calls_per_step']} | {r['us_per_call']} |"
              for r in summary["top"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mcvae_biked", help="a config name in configs/ or a YAML path")
    p.add_argument("--warmup", type=int, default=5, help="epochs before recording (not profiled)")
    p.add_argument("--epochs", type=int, default=30, help="epochs recorded")
    p.add_argument("--top", type=int, default=15, help="operators listed")
    p.add_argument("--csv_path", help="the data file (default: the config's)")
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    if args.warmup < 0 or args.epochs < 1:
        p.error("--warmup must be ≥ 0 and --epochs ≥ 1")
    import logging

    from experiments.sweep import make_config
    from modules.registry import MCVAE_SPEC
    from modules.training import train_main

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    callback = make_profiler_callback(args.warmup, args.epochs)
    spec = dataclasses.replace(MCVAE_SPEC, callbacks=lambda cfg, run_dir: [callback])
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"trainer.max_epochs": args.warmup + args.epochs}
        if args.csv_path:
            overrides["data.csv_path"] = str(Path(args.csv_path).resolve())
        config = make_config(args.config, overrides, Path(tmp) / "config.yaml")
        code = train_main(["--config", str(config), "--logdir", tmp, "--no_eval"], spec)
    if code != 0 or callback.profiler is None or not callback.seconds:
        print("profile_mcvae: the run ended before the recorded epochs", file=sys.stderr)
        return 1
    summary = summarise(callback.profiler, callback.seconds, callback.steps, args.top)
    summary.update(config=args.config, warmup=args.warmup, epochs=args.epochs, torch_threads=__import__("torch").get_num_threads())
    print(markdown(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where one mcVAE optimizer step goes, phase by phase, outside Lightning: masks, condition embedding, encode +
decode, loss + prior, backward, (clipping +) AdamW, EMA; one batch of the training split, one torch thread.

    python benchmarks/step_split_mcvae.py                       # mcvae_biked, 3 repeats × 300 steps
    python benchmarks/step_split_mcvae.py --config mcvae_biked_paper --steps 100

The sum is the step without Lightning: compare it with `fit`'s time per step (train_mcvae.py prints s/epoch;
28 steps an epoch on BIKED) to see what the training loop around it costs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PHASES = ("masks", "embedding", "encode + decode", "loss + prior", "backward", "clip + AdamW", "EMA")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mcvae_biked")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import torch

    from benchmarks.bench_mcvae_speed import built

    torch.set_num_threads(1)
    cfg, dm, model = built(args.config)
    x, cat, num = (t[:cfg.trainer.batch_size] for t in dm.tensors["train"])
    o = cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                            fused=True)
    p_mask = float(cfg.sparsity.initial)

    def step(i: int, totals: dict) -> None:
        t = [time.perf_counter()]
        g = torch.Generator().manual_seed(i)
        masked = model.mask(cat, num, p_mask, g)
        t.append(time.perf_counter())
        c = model.embed(masked)
        t.append(time.perf_counter())
        reconstruction, mu, logvar, _ = model._reconstruct(x, c, g)
        t.append(time.perf_counter())
        loss = model.loss(x, reconstruction, mu, logvar, model.prior(c))["loss"]
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        if o.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.gradient_clip_val, foreach=True)
        opt.step()
        t.append(time.perf_counter())
        if model.ema is not None:
            model.ema.update(model._averaged_parameters())
        t.append(time.perf_counter())
        for name, a, b in zip(PHASES, t, t[1:]):
            totals[name] += b - a

    step(0, dict.fromkeys(PHASES, 0.0))  # warm-up
    for repeat in range(args.repeats):
        totals = dict.fromkeys(PHASES, 0.0)
        for i in range(args.steps):
            step(i, totals)
        per_step = {k: v / args.steps * 1e3 for k, v in totals.items()}
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_step.items())
              + f"; step {sum(per_step.values()):.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

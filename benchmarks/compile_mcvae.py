"""Probe of issue 14's `torch.compile` lever: an mcVAE training step (masks, forward, loss, backward, fused AdamW)
with the forward + loss eager or compiled by inductor (backward through AOTAutograd), side by side in one process.

    python benchmarks/compile_mcvae.py                        # mcvae_biked, 6 alternating rounds × 300 steps
    python benchmarks/compile_mcvae.py --config mcvae_biked_paper --rounds 2 --steps 50

Both start from the same weights and see the same masks and noise; the report gives the median time ratio, the
compile time, and how far the compiled run's weights and loss drift from the eager run's after all steps (the
fused kernels add in another order). Not wired into training yet: a probe for the next step.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mcvae_biked")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    import torch

    from benchmarks.bench_mcvae_speed import built
    from modules.conditioning import MaskedConditions

    torch.set_num_threads(1)
    cfg, dm, base = built(args.config)
    x, cat, num = (t[:cfg.trainer.batch_size] for t in dm.tensors["train"])
    latent = cfg.model.latent_dim

    def setup(compiled: bool):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, fused=True)

        def loss_fn(x, c_cat, c_num, c_mask, eps):
            c = model.embed(MaskedConditions(c_cat, c_num, c_mask))
            reconstruction, mu, logvar, _ = model._reconstruct(x, c, noise=eps)
            return model.loss(x, reconstruction, mu, logvar, model.prior(c))["loss"]

        return model, opt, (torch.compile(loss_fn, dynamic=False) if compiled else loss_fn)

    def run(state, first: int, n: int) -> tuple[float, float]:
        model, opt, fn = state
        started = time.perf_counter()
        for i in range(first, first + n):
            g = torch.Generator().manual_seed(i)
            m = model.mask(cat, num, float(cfg.sparsity.initial), g)
            eps = torch.randn((len(x), latent), generator=g)
            opt.zero_grad(set_to_none=True)
            loss = fn(x, m.categorical, m.numerical, m.numerical_mask, eps)
            loss.backward()
            opt.step()
        return (time.perf_counter() - started) / n * 1e3, loss.item()

    eager, compiled = setup(False), setup(True)
    started = time.perf_counter()
    run(compiled, 0, 1)
    run(eager, 0, 1)
    print(f"compiled in {time.perf_counter() - started:.1f} s (inductor's cache makes a second process faster)")
    ratios, step = [], 1
    for r in range(args.rounds):
        e, loss_e = run(eager, step, args.steps)
        c, loss_c = run(compiled, step, args.steps)
        step += args.steps
        ratios.append(e / c)
        print(f"round {r + 1}: eager {e:.3f} ms a step, compiled {c:.3f} ms: {e / c:.2f}×", flush=True)
    drift = max(float(((a - b).abs().max() / a.abs().max().clamp(min=1e-12)))
                for a, b in zip(eager[0].parameters(), compiled[0].parameters()))
    print(f"median {statistics.median(ratios):.2f}× over {len(ratios)} rounds; after {step} steps the loss is "
          f"{loss_e:.6g} eager and {loss_c:.6g} compiled, the weights differ by up to {drift:.2e} of a tensor's "
          "largest value")
    return 0


if __name__ == "__main__":
    sys.exit(main())

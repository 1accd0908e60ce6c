"""Is a conv-mcVAE's prior what limits its samples? Decode every test row's conditions (none masked) with z from

- `prior`: p(z | c), as `generate` does (the EMA weights);
- `same_conditions`: the posterior q(z | x) of a random training image with the same categorical conditions
  (the aggregate posterior restricted to c, the prior that the KL term asks p(z | c) to be; Tomczak & Welling 2018);
- `any_training`: the posterior of any random training image;

and score each against the real test image: pixel MSE of one sample (averaged over the k samples), of the mean of
the k samples, and their spread (one_sample = mean_of_k + spread exactly). Beside them, k real training images with
the same categorical conditions, and the mean training image. If `same_conditions` beats `prior`, the decoder can
draw better images than p(z | c) lets it: the prior is the bottleneck.

    python benchmarks/prior_probe_conv_mcvae.py --ckpt logs/<run>/checkpoints/last.ckpt [--k 8] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def same_condition_rows(train_cat: torch.Tensor, cat: torch.Tensor) -> list[torch.Tensor]:
    """Per test row, the training rows with all its categorical conditions (every row where none matches)."""
    rows = []
    for one in cat:
        match = (train_cat == one).all(1).nonzero().flatten()
        rows.append(match if len(match) else torch.arange(len(train_cat)))
    return rows


@torch.no_grad()
def probe(model, dm, *, k: int = 8, seed: int = 0, split: str = "test", chunk: int = 256) -> pd.DataFrame:
    from modules.image_data import to_model_range

    model.eval()
    raw, cat, num = dm.split_images(split)
    x = to_model_range(raw, dm.cfg.value_range).to(model.device)
    tr_raw, tr_cat, tr_num = dm.split_images("train")
    train = to_model_range(tr_raw, dm.cfg.value_range).to(model.device)
    visible = lambda c, n: model.masking.apply(c, n, torch.zeros_like(c, dtype=torch.bool),  # noqa: E731
                                               torch.zeros_like(n, dtype=torch.bool))
    mus, logvars = [], []
    for i in range(0, len(train), chunk):
        c = model.embed(visible(tr_cat[i:i + chunk], tr_num[i:i + chunk]))
        mu, logvar = model.encode(train[i:i + chunk], c)
        mus.append(mu)
        logvars.append(logvar)
    mu, logvar = torch.cat(mus), torch.cat(logvars)
    c_test = model.embed(visible(cat, num), averaged=True)
    g = torch.Generator().manual_seed(seed)
    matches = same_condition_rows(tr_cat, cat)
    pick = lambda: torch.stack([m[torch.randint(len(m), (1,), generator=g)][0] for m in matches])  # noqa: E731

    def scores(samples: torch.Tensor) -> dict:
        mean = samples.mean(0)
        return {"one_sample": float((samples - x).pow(2).mean()), "mean_of_k": float((mean - x).pow(2).mean()),
                "spread": float((samples - mean).pow(2).mean())}

    rows = []
    for source in ("prior", "same_conditions", "any_training"):
        samples = []
        for _ in range(k):
            eps = torch.randn((len(x), *model.latent_shape), generator=g).to(model.device)
            if source == "prior":
                z = model.from_prior(eps * model.temperature, c_test, averaged=True)
            else:
                j = pick() if source == "same_conditions" else torch.randint(len(train), (len(x),), generator=g)
                z = mu[j] + eps * torch.exp(0.5 * logvar[j])
            samples.append(model.decode(z, c_test, averaged=True))
        rows.append({"z_from": source, **scores(torch.stack(samples))})
    rows.append({"z_from": "real training images, same conditions", **scores(torch.stack([train[pick()] for _ in range(k)]))})
    mean_image = float((train.mean(0, keepdim=True) - x).pow(2).mean())
    rows.append({"z_from": "mean training image", "one_sample": mean_image, "mean_of_k": mean_image, "spread": 0.0})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--k", type=int, default=8, help="samples per test image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--out", help="CSV of the table (default: print only)")
    args = p.parse_args(argv)
    from modules.registry import spec_for
    from modules.training import quiet_lightning, read_checkpoint

    quiet_lightning()
    checkpoint = read_checkpoint(Path(args.ckpt))
    spec = spec_for(checkpoint, args.ckpt)
    if spec.model_type != "conv_mcvae":
        p.error(f"{args.ckpt} is a {spec.model_type} checkpoint; this probe is for the conv-mcVAE")
    dm, model = spec.load(checkpoint, None)
    table = probe(model, dm, k=args.k, seed=args.seed, split=args.split)
    print(f"Pixel MSE at sparsity 0 on the {args.split} split, k = {args.k} samples per image:")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

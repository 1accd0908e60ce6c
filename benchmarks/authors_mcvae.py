"""The authors' published mcVAE training loop, loaded from a fetched copy of their repository
(github.com/Phillip-M97/Masked_Conditioning), to time it side by side with this project's (issue 14).

Their `modules/utils.py` and `modules/data.py` import torchvision, diffusers and openTSNE at the top, which this
project does not depend on (torchvision does not even import beside its torch). So the definitions the loop needs
are read from their source files and executed alone: `mcVAE`, `ConditionMasking` and `ConditionEmbedding` from
`modules/emb_mcvae.py`; `train_step`, `val_step` and `vae_loss` from `modules/utils.py`; `RefPointData` from
`modules/data.py`. Nothing of theirs is copied into this repository.

The loop is what their `train_mcvae.py` runs per epoch: `train_step` over a shuffled `DataLoader` of
`RefPointData` (batch 128), then `val_step`, with AdamW(lr 1e-3, betas (0.9, 0.99), weight decay 0.1), their
SSE + 0.7·KL loss, and the paper's layers (design embedding 64, hidden 128-64-32, latent 10, SELU,
embedding dim 5). It runs on this project's split of the same BIKED rows, so both loops see the same number of
batches.
"""
from __future__ import annotations

import ast
import time
from pathlib import Path

# their condition names in `get_architecture_biked` (train_mcvae.py), in the order of this project's BIKED configs
AUTHOR_CONDITION_KEYS = {
    "BikeStyle": "bs_dim", "Teeth on chainring": "tc_dim", "bottle SEATTUBE0 show OHCLASS: True": "bst_dim",
    "bottle DOWNTUBE0 show OHCLASS: True": "bdt_dim", "frame_size": "fs_dim", "RIM_STYLE front": "rsf_dim",
    "RIM_STYLE rear": "rsr_dim", "Fork type": "ft_dim",
}


class AuthorsCodeError(RuntimeError):
    pass


def load_definitions(source: Path, names: set[str], namespace: dict) -> None:
    """Execute the top-level classes and functions `names` of the Python file `source` in `namespace`."""
    if not source.is_file():
        raise AuthorsCodeError(f"{source} does not exist: pass --authors the root of a copy of "
                               "github.com/Phillip-M97/Masked_Conditioning (the folder holding modules/emb_mcvae.py).")
    tree = ast.parse(source.read_text(), filename=str(source))
    found = [node for node in tree.body
             if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in names]
    missing = names - {node.name for node in found}
    if missing:
        raise AuthorsCodeError(f"{source} defines no {', '.join(sorted(missing))}: the authors' code has changed; "
                               "point --authors at a copy whose modules match the published ones.")
    exec(compile(ast.Module(body=found, type_ignores=[]), str(source), "exec"), namespace)


def authors_namespace(root: str | Path) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    root = Path(root)
    namespace = {"torch": torch, "nn": nn, "Dataset": Dataset, "DataLoader": DataLoader, "DEVICE": "cpu",
                 "__name__": "authors_mcvae"}
    load_definitions(root / "modules" / "emb_mcvae.py", {"ConditionMasking", "ConditionEmbedding", "mcVAE"}, namespace)
    load_definitions(root / "modules" / "data.py", {"RefPointData"}, namespace)
    load_definitions(root / "modules" / "utils.py", {"vae_loss", "train_step", "val_step"}, namespace)
    return namespace


def time_authors_loop(ns: dict, datamodule, *, epochs: int = 30, seed: int = 42) -> list[float]:
    """Seconds per epoch (train_step + val_step) of the authors' loop on `datamodule`'s training and validation
    rows (designs as this project scales them; categorical conditions as codes, which their masking shifts by
    one so that 0 is the mask; the chainring as its scaled value, 0 where missing). `ns`: their definitions
    (`authors_namespace`)."""
    import numpy as np
    import torch
    from torch import nn

    schema = datamodule.schema
    names = [c.name for c in schema.categorical] + [c.name for c in schema.numerical]
    unknown = [n for n in names if n not in AUTHOR_CONDITION_KEYS]
    if unknown:
        raise AuthorsCodeError(f"the authors' BIKED architecture has no condition {unknown[0]!r}; time it with a "
                               "BIKED config (mcvae_biked_paper).")
    arch = {"rp_dim": datamodule.tensors["train"][0].shape[1], "cond_dims": [AUTHOR_CONDITION_KEYS[n] for n in names],
            "y_embed_dim": 5, "numerical_cond": ["tc_dim"], "rp_embed_dim": 64, "hidden_dim": [128, 64, 32],
            "latent_dim": 10, "activation": nn.SELU()}
    for c in schema.categorical:
        arch[AUTHOR_CONDITION_KEYS[c.name]] = len(schema.vocabularies[c.vocabulary])
    spars = {"sparsity": 0.1, "mask_value": -1}

    def rows(split):
        x, cat, num = datamodule.tensors[split][:3]
        y = torch.cat([cat.float(), torch.nan_to_num(num, nan=0.0)], dim=1)
        return x.numpy().astype(np.float64), y.numpy().astype(np.float64)

    torch.manual_seed(seed)
    train, val = ns["RefPointData"](*rows("train")), ns["RefPointData"](*rows("val"))
    train_loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True)
    val_loader = torch.utils.data.DataLoader(val, batch_size=128, shuffle=False)
    model = ns["mcVAE"](arch, spars)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        ns["train_step"](train_loader, model, ns["vae_loss"], optimizer, 0.7)
        ns["val_step"](val_loader, model, ns["vae_loss"], 0.7)
        seconds.append(time.perf_counter() - started)
    return seconds


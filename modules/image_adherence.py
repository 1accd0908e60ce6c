"""Condition adherence for image models: a small CNN trained on real training images predicts each condition;
its accuracy (R² for numerical conditions) on real test images is the reference for generated images."""
from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from modules.baselines import informative, majority_scores
from modules.conditioning import MaskedConditions
from modules.config import EvaluationConfig
from modules.evaluation import count_column, level_column, level_masks, mask_draws
from modules.progress import bar


class ConditionClassifier(nn.Module):
    """Four stride-2 conv layers, global average pooling, one head per condition (logits or a value)."""

    def __init__(self, channels: int, schema, width: int = 32):
        super().__init__()
        layers, previous = [], channels
        for i in range(4):
            layers += [nn.Conv2d(previous, width * 2 ** min(i, 2), 3, stride=2, padding=1), nn.GroupNorm(8, width * 2 ** min(i, 2)), nn.SiLU()]
            previous = width * 2 ** min(i, 2)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.categorical = nn.ModuleList(nn.Linear(previous, len(schema.vocabularies[c.vocabulary]))
                                         for c in schema.categorical)
        self.numerical = nn.Linear(previous, len(schema.numerical)) if schema.numerical else None

    def forward(self, images):
        h = self.features(images)
        return [head(h) for head in self.categorical], (self.numerical(h) if self.numerical is not None else None)


def _loss(model: ConditionClassifier, images, cat, num, tokens):
    logits, values = model(images)
    loss = images.new_zeros(())
    for j, head in enumerate(logits):
        known = cat[:, j] != tokens[j]
        if known.any():
            loss = loss + F.cross_entropy(head[known], cat[known, j])
    if values is not None:
        known = ~torch.isnan(num)
        if known.any():
            loss = loss + F.mse_loss(values[known], num[known])
    return loss


def fit_condition_classifier(images: torch.Tensor, cat: torch.Tensor, num: torch.Tensor, schema, *, epochs: int = 15,
                             batch_size: int = 128, seed: int = 0) -> ConditionClassifier:
    """Train on real images (model value range) and their known conditions; deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ConditionClassifier(images.shape[1], schema).to(images.device)
    tokens = torch.tensor(schema.mask_tokens(), device=images.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    with torch.enable_grad():  # callers evaluate under no_grad
        _train(model, optimizer, images, cat, num, tokens, epochs, batch_size, generator)
    return model.eval()


def _train(model, optimizer, images, cat, num, tokens, epochs: int, batch_size: int, generator) -> None:
    starts = range(0, len(images), batch_size)
    progress = bar(desc="adherence CNN", total=epochs * len(starts), unit="batch")
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator).to(images.device)
        for start in starts:
            idx = order[start:start + batch_size]
            loss = _loss(model, images[idx], cat[idx], num[idx], tokens)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            progress.update()
        if starts and not progress.disable:  # once per epoch, and only for a drawn bar: reading the loss syncs
            progress.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{float(loss.detach()):.3f}", refresh=False)
    progress.close()


@torch.no_grad()
def _predict(model: ConditionClassifier, images: torch.Tensor, batch_size: int = 256):
    logits, values = [], []
    for start in range(0, len(images), batch_size):
        heads, value = model(images[start:start + batch_size])
        logits.append(torch.stack([h.argmax(1) for h in heads], dim=1) if heads else None)
        values.append(value)
    cat = torch.cat(logits) if logits[0] is not None else None
    num = torch.cat(values) if values[0] is not None else None
    return cat, num


def generate_in_chunks(model, conditions: MaskedConditions, generator: torch.Generator, chunk: int = 256):
    """One generated image per row of `conditions`, `chunk` rows at a time (the noise drawn in that order)."""
    return torch.cat([model.generate(conditions.rows(s, s + chunk), generator=generator)
                      for s in range(0, len(conditions), chunk)])


def _scores(schema, predicted, cat, num, keep_cat, keep_num) -> dict[str, float]:
    scores = {}
    pred_cat, pred_num = predicted
    for j, cond in enumerate(schema.categorical):
        keep = keep_cat[:, j]
        scores[cond.name] = float((pred_cat[keep, j] == cat[keep, j]).float().mean()) if keep.any() else float("nan")
    for j, cond in enumerate(schema.numerical):
        keep = keep_num[:, j]
        truth, guess = num[keep, j], pred_num[keep, j]
        if keep.sum() < 2:
            scores[cond.name] = float("nan")
            continue
        scores[cond.name] = float(1 - ((guess - truth) ** 2).sum() / ((truth - truth.mean()) ** 2).sum().clamp_min(1e-12))
    return scores


def majority_per_condition(schema, cat, num, train_cat, train_num) -> dict[str, float]:
    """Per condition, the score of not looking at the image on the known test values: the majority training
    category's accuracy, the training mean's R²."""
    tokens = torch.tensor(schema.mask_tokens(), device=cat.device)
    out = {}
    for j, cond in enumerate(schema.categorical):
        reference = train_cat[:, j][train_cat[:, j] != tokens[j]]
        known = cat[:, j] != tokens[j]
        out[cond.name] = majority_scores("categorical", reference.cpu().numpy(), cat[known, j].cpu().numpy())
    for j, cond in enumerate(schema.numerical):
        reference = train_num[:, j][~torch.isnan(train_num[:, j])]
        known = ~torch.isnan(num[:, j])
        out[cond.name] = majority_scores("numerical", reference.cpu().numpy(), num[known, j].cpu().numpy())
    return out


@torch.no_grad()
def image_adherence(model, classifier: ConditionClassifier, images, cat, num, cfg: EvaluationConfig,
                    train_cat: torch.Tensor | None = None, train_num: torch.Tensor | None = None,
                    on_generated=None) -> pd.DataFrame:
    """Accuracy / R² of the classifier on real test images and on images generated from the test conditions at
    each sparsity level, scored on the conditions that were neither missing nor masked. `majority`: the accuracy
    of always answering the most frequent training category (the R² of the training mean for numerical
    conditions), the floor a useful classifier must beat; `informative`: the real images clear it. `n`: the real
    test images scored, `n_<level>`: the generated images scored at that level.
    `on_generated(level, images)` sees each level's generated images (for the FID)."""
    schema = model.schema
    tokens = torch.tensor(schema.mask_tokens(), device=cat.device)
    known_cat, known_num = cat != tokens, ~torch.isnan(num)
    rows = {c.name: {"condition": c.name, "kind": c.kind, "metric": "accuracy" if c.kind == "categorical" else "r2"}
            for c in schema.conditions}
    majority = majority_per_condition(schema, cat, num, train_cat if train_cat is not None else cat,
                                      train_num if train_num is not None else num)
    for name, value in majority.items():
        rows[name]["majority"] = value
    for name, value in _scores(schema, _predict(classifier, images), cat, num, known_cat, known_num).items():
        rows[name]["real"] = value
    counts = {**{c.name: int(known_cat[:, j].sum()) for j, c in enumerate(schema.categorical)},
              **{c.name: int(known_num[:, j].sum()) for j, c in enumerate(schema.numerical)}}
    for name, row in rows.items():
        row["informative"] = informative(row["kind"], row["real"], row["majority"], counts[name])
        row["n"] = counts[name]
    uniform = mask_draws(cat, num, cfg)
    g = torch.Generator(device=cat.device).manual_seed(cfg.paper_z_seed + 3000)
    scored = {name: {} for name in rows}
    for level in bar(cfg.sparsity_levels, desc="adherence of generated images", unit="level"):
        conditions = level_masks(model, cat, num, level, uniform)
        generated = generate_in_chunks(model, conditions, g)
        if on_generated is not None:
            on_generated(level, generated)
        keep_cat = known_cat & (conditions.categorical != tokens)
        keep_num = known_num & ~conditions.numerical_mask
        for name, value in _scores(schema, _predict(classifier, generated), cat, num, keep_cat, keep_num).items():
            rows[name][level_column(level)] = value
        for j, c in enumerate(schema.categorical):
            scored[c.name][count_column(level)] = int(keep_cat[:, j].sum())
        for j, c in enumerate(schema.numerical):
            scored[c.name][count_column(level)] = int(keep_num[:, j].sum())
    return pd.DataFrame([{**rows[name], **scored[name]} for name in rows])


@torch.no_grad()
def nearest_image_adherence(generated: torch.Tensor, images: torch.Tensor, cat: torch.Tensor, num: torch.Tensor,
                            train_images: torch.Tensor, train_cat: torch.Tensor, train_num: torch.Tensor, schema,
                            *, chunk: int = 512) -> pd.DataFrame:
    """Adherence without a network: each image's nearest training image (pixel L2, model value range) lends its
    conditions as the prediction. A generator cannot win this by drawing what one classifier's features respond
    to; it has to draw bikes like the real ones that have the asked conditions. `real`: the same for the real
    test images (the reference); `generated`: images generated from the same rows' conditions, none masked.
    Accuracy for categorical conditions, R² for numerical ones, over the rows where both values are known."""
    def nearest(queries: torch.Tensor, which: str) -> torch.Tensor:
        flat = queries.flatten(1).float()
        best = torch.full((len(flat),), float("inf"), device=flat.device)
        index = torch.zeros(len(flat), dtype=torch.long, device=flat.device)
        for start in bar(range(0, len(train_images), chunk), desc=f"nearest training image of the {which} images",
                         unit="chunk"):
            block = train_images[start:start + chunk].flatten(1).float().to(flat.device)
            distance, position = torch.cdist(flat, block).min(dim=1)
            closer = distance < best
            best, index = torch.where(closer, distance, best), torch.where(closer, position + start, index)
        return index

    tokens = torch.tensor(schema.mask_tokens(), device=cat.device)
    majority = majority_per_condition(schema, cat, num, train_cat, train_num)
    rows = {c.name: {"condition": c.name, "metric": "accuracy" if c.kind == "categorical" else "r2",
                     "majority": majority[c.name]} for c in schema.conditions}
    for name, queries in (("real", images), ("generated", generated)):
        index = nearest(queries, name)
        lent_cat = train_cat[index.to(train_cat.device)].to(cat.device)  # the neighbours' conditions
        lent_num = train_num[index.to(train_num.device)].to(num.device)
        keep_cat = (cat != tokens) & (lent_cat != tokens)
        keep_num = ~torch.isnan(num) & ~torch.isnan(lent_num)
        for condition, value in _scores(schema, (lent_cat, lent_num), cat, num, keep_cat, keep_num).items():
            rows[condition][name] = value
        for j, c in enumerate(schema.categorical):
            rows[c.name][f"n_{name}"] = int(keep_cat[:, j].sum())
        for j, c in enumerate(schema.numerical):
            rows[c.name][f"n_{name}"] = int(keep_num[:, j].sum())
    ordered = [rows[c.name] for c in schema.categorical] + [rows[c.name] for c in schema.numerical]
    return pd.DataFrame(ordered)[["condition", "metric", "majority", "real", "generated", "n_real", "n_generated"]]


@torch.no_grad()
def asked_for_adherence(model, classifier: ConditionClassifier, images: torch.Tensor, cat: torch.Tensor,
                        num: torch.Tensor, *, train_cat: torch.Tensor, rows: int, seed: int) -> pd.DataFrame:
    """For every category of every categorical condition: the first `rows` test rows with that condition set to
    the category and the others as they are, one sample each; `generated`: the share the classifier reads as the
    asked category, `real`: its recall on the real test images of that category (`n_real` of them), the
    reference. Always drawing the majority category scores 1 on it and 0 on every other, so the mean over a
    condition's categories (the `balanced` rows, over the categories with real test images) shows a model that
    ignores c, which plain accuracy on the test rows — mostly the majority category — hides."""
    schema = model.schema
    tokens = torch.tensor(schema.mask_tokens(), device=cat.device)
    predicted_real = _predict(classifier, images)[0]
    asked_cat, asked_num = cat[:rows], num[:rows]
    nothing = torch.zeros_like(asked_cat, dtype=torch.bool)
    unmasked_num = torch.zeros_like(asked_num, dtype=torch.bool)
    g = torch.Generator(device=cat.device).manual_seed(seed)
    out = []
    progress = bar(desc="asked-for adherence", total=sum(len(schema.vocabulary_of(c.name)) for c in schema.categorical),
                   unit="category")
    for j, cond in enumerate(schema.categorical):
        vocab = schema.vocabulary_of(cond.name)
        known_train = train_cat[:, j][train_cat[:, j] != tokens[j].to(train_cat.device)]
        per_category = []
        for k, category in enumerate(vocab):
            changed = asked_cat.clone()
            changed[:, j] = k
            conditions = model.masking.apply(changed, asked_num, nothing, unmasked_num)
            generated = generate_in_chunks(model, conditions, g)
            share = float((_predict(classifier, generated)[0][:, j] == k).float().mean())
            real_rows = cat[:, j] == k
            per_category.append({
                "condition": cond.name, "category": category,
                "train_share": float((known_train == k).float().mean()) if len(known_train) else float("nan"),
                "n_real": int(real_rows.sum()),
                "real": float((predicted_real[real_rows, j] == k).float().mean()) if real_rows.any() else float("nan"),
                "generated": share})
            progress.update()
        frame = pd.DataFrame(per_category)
        present = frame[frame["n_real"] > 0]  # like for like: the categories that have real test images
        out.extend(per_category)
        out.append({"condition": cond.name, "category": f"balanced (mean over the {len(present)} categories in the test split)",
                    "train_share": float("nan"), "n_real": int(frame["n_real"].sum()),
                    "real": float(present["real"].mean()), "generated": float(present["generated"].mean())})
    progress.close()
    return pd.DataFrame(out)

"""Fréchet distance between real and generated images (Heusel et al. 2017, Eq. 6) with torchmetrics' FID and a
pluggable feature extractor: Inception-v3 when torch-fidelity and its weights are there, otherwise the features
of the adherence classifier (trained on the real training images of this data set)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from modules.errors import UserError


class ClassifierFeatures(nn.Module):
    """The pooled features of the adherence CNN as an FID feature extractor (images in [0, 1] → (N, d)).

    Not comparable with Inception FIDs in papers: a ranking of models on the same data set, no more."""

    def __init__(self, classifier: nn.Module, value_range: str):
        super().__init__()
        self.classifier = classifier.eval()
        self.value_range = value_range
        with torch.no_grad():
            probe = next(classifier.parameters())
            channels = classifier.features[0].in_channels
            self.num_features = int(classifier.features(probe.new_zeros(1, channels, 32, 32)).shape[-1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        x = x * 2 - 1 if self.value_range == "minus_one_one" else x
        return self.classifier.features(x).double()


def inception_features(weights_path: Optional[str], *, required: bool):
    """torchmetrics' Inception-v3 (2048 features) when torch-fidelity and the weights file are present; else None,
    or a UserError saying what is missing when `required`."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        if required:
            raise UserError("evaluation.fid: inception needs torch-fidelity (pip install torch-fidelity) and its "
                            "Inception weights (evaluation.inception_weights: path of pt_inception-2015-12-05-6726825d.pth)"
                            "; or use fid: classifier.") from None
        return None
    if not weights_path or not Path(weights_path).is_file():
        if required:
            raise UserError(f"evaluation.inception_weights = {weights_path!r} is not a file: download "
                            "pt_inception-2015-12-05-6726825d.pth elsewhere and give its path, or use fid: classifier.")
        return None
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(weights_path))


class FrechetDistance:
    """FID of generated image sets against one set of real images; the real statistics are computed once."""

    def __init__(self, extractor: nn.Module, real: torch.Tensor, *, name: str, batch_size: int = 128):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.name, self.batch_size = name, batch_size
        inception = not isinstance(extractor, ClassifierFeatures)
        # Inception takes uint8 RGB; the classifier floats in [0, 1] with the data's channels
        self.metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False,
                                               normalize=not inception).to(real.device)
        self.inception = inception
        for start in range(0, len(real), batch_size):
            self.metric.update(self._prepare(real[start:start + batch_size]), real=True)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) → what the extractor takes."""
        if self.inception:
            return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return images.float() / 255.0

    def __call__(self, generated: torch.Tensor) -> float:
        """FID of uint8 generated images against the real set."""
        self.metric.reset()  # keeps the real statistics
        for start in range(0, len(generated), self.batch_size):
            self.metric.update(self._prepare(generated[start:start + self.batch_size]), real=False)
        return float(self.metric.compute())


def make_fid(kind: str, weights_path: Optional[str], classifier: Optional[nn.Module], real: torch.Tensor,
             value_range: str) -> Optional[FrechetDistance]:
    """The FID of `evaluation.fid`: inception, classifier, auto (inception when available, else classifier), none."""
    if kind == "none" or len(real) < 2:
        return None
    extractor = inception_features(weights_path, required=kind == "inception") if kind in ("inception", "auto") else None
    if extractor is not None:
        return FrechetDistance(extractor.to(real.device), real, name="inception-v3")
    if classifier is None:
        return None
    return FrechetDistance(ClassifierFeatures(classifier, value_range), real, name="condition classifier features")

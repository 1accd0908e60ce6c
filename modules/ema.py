"""Exponential moving average of a module's weights (Polyak & Juditsky 1992), kept as a frozen copy."""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn


class EMA(nn.Module):
    """θ_ema ← d·θ_ema + (1 − d)·θ after every optimizer step, with the warm-up d = min(decay, (1 + n)/(10 + n))
    so that short runs are not dominated by the initial weights; the copy is saved with the model."""

    def __init__(self, module: nn.Module, *, decay: float = 0.999):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(module).requires_grad_(False).eval()
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._updates = 0  # a host copy of `updates`: reading the buffer every step would sync with the GPU
        self._shadow_params: list[torch.Tensor] | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._updates = int(self.updates)

    def _apply(self, fn, recurse=True):
        self._shadow_params = None  # .to()/.half() may replace the parameter tensors
        return super()._apply(fn, recurse)

    def current_decay(self) -> float:
        n = self._updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.Tensor]) -> None:
        """Move the average towards `parameters` (the live module's, in `shadow.parameters()` order)."""
        decay = self.current_decay()
        if self._shadow_params is None:  # cached: listing a module's parameters every step costs more than the lerp
            self._shadow_params = list(self.shadow.parameters())
        torch._foreach_lerp_(self._shadow_params, [p.detach() for p in parameters], 1.0 - decay)
        self.updates += 1
        self._updates += 1

    def train(self, mode: bool = True):
        super().train(mode)
        self.shadow.eval()  # the average is only ever used for inference
        return self

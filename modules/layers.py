"""Layers shared by the convolutional models (conv-mcVAE, the mcLDM UNet): GroupNorm and multi-head self-attention."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: Optional[int] = None) -> nn.GroupNorm:
    """GroupNorm over `channels`. groups None: the largest of 8, 4, 2, 1 that divides the channels (the conv models);
    a number: that many groups, or the largest divisor of the channels below it (the paper's UNet asks for 32)."""
    if groups is None:
        count = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    else:
        count = next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(count, channels)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H·W positions (Vaswani et al. 2017, Eq. 1) with a residual connection.

    Heads are split from the channel axis (B, heads, HW, d), not from a reshape that mixes heads and positions;
    attention dropout only in training.
    """

    def __init__(self, channels: int, *, heads: int, head_dim: int, dropout: float, norm_groups: Optional[int] = None):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * heads * head_dim, 1)
        self.out = nn.Conv2d(heads * head_dim, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, self.head_dim, h * w).transpose(-1, -2).unbind(1)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return x + self.out(attended.transpose(-1, -2).reshape(b, self.heads * self.head_dim, h, w))

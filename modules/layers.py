"""Layers shared by the convolutional models (conv-mcVAE, the mcLDM UNet): GroupNorm and multi-head self-attention."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count ≤ 8 that divides the channels."""
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H·W positions (Vaswani et al. 2017, Eq. 1) with a residual connection.

    Heads are split from the channel axis (B, heads, HW, d), not from a reshape that mixes heads and positions;
    attention dropout only in training.
    """

    def __init__(self, channels: int, *, heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * heads * head_dim, 1)
        self.out = nn.Conv2d(heads * head_dim, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, self.head_dim, h * w).transpose(-1, -2).unbind(1)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return x + self.out(attended.transpose(-1, -2).reshape(b, self.heads * self.head_dim, h, w))

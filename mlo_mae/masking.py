"""The masking network T and how its scores become a mask and a weighted loss.

Conventions (MAE's): ``mask`` is 1 for a masked (hidden, reconstructed) patch and
0 for a visible one; ``ids_keep`` are the visible patches, ``ids_restore`` puts
[visible, masked] back into image order.

Rounding: the number of masked patches is round-half-up(r * N), clamped to
[1, N - 1] so that at least one patch is hidden and one is seen. For r = 0.75
and N = 64 that is 48; for N = 196 it is 147.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def num_masked(num_patches: int, mask_ratio: float) -> int:
    """round-half-up(r * N), clamped to [1, N - 1]."""
    k = int(math.floor(mask_ratio * num_patches + 0.5))
    return min(max(k, 1), num_patches - 1)


class MaskingNetwork(nn.Module):
    """T: Linear(N*d -> hidden), ReLU, Linear(hidden -> N), sigmoid, one probability per patch."""

    def __init__(self, num_patches: int, embed_dim: int, hidden_dim: int = 512) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.fc1 = nn.Linear(num_patches * embed_dim, hidden_dim)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden_dim, num_patches)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, d) embedded patches -> (B, N) masking probabilities."""
        return torch.sigmoid(self.fc2(self.act(self.fc1(tokens.flatten(1)))))


@dataclass
class Mask:
    ids_keep: torch.Tensor  # (B, N - K) visible patches, lowest scores first
    ids_restore: torch.Tensor  # (B, N)
    mask: torch.Tensor  # (B, N), 1 = masked


def _mask_from_order(order: torch.Tensor, k: int) -> Mask:
    """``order`` lists patches from most to least 'keep-worthy'; the last k are masked."""
    n = order.shape[1]
    ids_restore = torch.argsort(order, dim=1)
    mask = torch.ones(order.shape, device=order.device)
    mask[:, : n - k] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Mask(ids_keep=order[:, : n - k], ids_restore=ids_restore, mask=mask)


def top_k_mask(probs: torch.Tensor, mask_ratio: float) -> Mask:
    """Mask the round(r*N) patches with the HIGHEST probability (hard choice, no gradient)."""
    k = num_masked(probs.shape[1], mask_ratio)
    order = torch.argsort(probs.detach(), dim=1, stable=True)  # ascending: kept first
    return _mask_from_order(order, k)


def random_mask(batch: int, num_patches: int, mask_ratio: float, device: torch.device) -> Mask:
    """MAE's uniformly random masking (baseline mode): same count, uniform choice."""
    k = num_masked(num_patches, mask_ratio)
    order = torch.argsort(torch.rand(batch, num_patches, device=device), dim=1)
    return _mask_from_order(order, k)


def weighted_reconstruction_loss(errors: torch.Tensor, mask: torch.Tensor,
                                 probs: torch.Tensor | None) -> torch.Tensor:
    """Stage I loss: sum over masked patches of p_i * err_i, divided by the number masked.

    The divisor is the fixed count, not sum(p): scaling every probability up
    scales the loss, so T's gradient sees absolute as well as relative weights.
    ``probs=None`` is plain MAE (every weight 1).
    """
    weights = mask if probs is None else mask * probs
    return (errors * weights).sum() / mask.sum()

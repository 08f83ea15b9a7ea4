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
    """T: Linear(N*d -> hidden), ReLU, Linear(hidden -> N), sigmoid, one probability per patch.

    With ``centre``, the input is centred per position and channel by a running mean
    of the patch embeddings (``track_input``): most of the input's energy (position
    embeddings, blank patches) is the same for every image, and without centring an
    optimiser step moves every image's logits alike.
    """

    def __init__(self, num_patches: int, embed_dim: int, hidden_dim: int = 512, centre: bool = False) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.centre = centre
        self.fc1 = nn.Linear(num_patches * embed_dim, hidden_dim)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden_dim, num_patches)
        if centre:
            self.register_buffer("input_mean", torch.zeros(num_patches, embed_dim))
            self.register_buffer("input_count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def track_input(self, batch_mean: torch.Tensor, momentum: float = 0.1) -> None:
        """Fold one (N, d) batch mean of the input into the running mean (a plain average at first)."""
        if not self.centre:
            return
        rate = max(momentum, 1.0 / float(self.input_count + 1))
        self.input_mean.lerp_(batch_mean.to(self.input_mean.dtype), rate)
        self.input_count += 1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, d) embedded patches -> (B, N) masking probabilities."""
        if self.centre:
            tokens = tokens - self.input_mean
        return torch.sigmoid(self.fc2(self.act(self.fc1(tokens.flatten(1)))))


class PatchScorer(nn.Module):
    """T as one small MLP applied to every patch embedding alone: Linear(d -> hidden), ReLU,
    Linear(hidden -> 1); the image's logits are then standardised (mean 0, standard deviation
    ``SPREAD``) before the sigmoid.

    Shared across positions, so a patch's score follows its content (and its position
    embedding); d*hidden weights instead of N*d*hidden. Only the order of an image's scores
    (the top-k choice) and their relative sizes (the ``sum``-normalised Stage-I weights)
    matter, so their level and spread are fixed rather than learned. Measured without it:
    a free level drifted (mean p 0.5 -> 0.01 in 90 iterations on digits) and a free spread
    grew until half of the probabilities were below 0.01 or above 0.99 after 500
    iterations on Fashion-MNIST, where masked patches with p ~ 0 drop out of Stage I and
    T's gradients vanish. With a spread of 2, about 1% of the scores lie beyond 0.01/0.99.
    """

    centre = False
    SPREAD = 2.0

    def __init__(self, embed_dim: int, hidden_dim: int = 512) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden_dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, d) embedded patches -> (B, N) masking probabilities."""
        logits = self.fc2(self.act(self.fc1(tokens))).squeeze(-1)
        centred = logits - logits.mean(1, keepdim=True)
        return torch.sigmoid(self.SPREAD * centred / (centred.std(1, keepdim=True) + 1e-6))


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
                                 probs: torch.Tensor | None, norm: str = "count") -> torch.Tensor:
    """Stage I loss: each masked patch's error weighted by its probability.

    ``norm="count"`` (the authors' code): sum over masked patches of p_i * err_i, divided by
    the number masked. Lowering every p lowers the loss and Stage I's effective step, so T
    can switch Stage I off. ``norm="sum"``: per image, the p-weighted mean of its masked
    errors (divided by the sum of p over its masked patches), averaged over images; T can
    only move weight between patches, and the loss has MAE's scale. ``probs=None`` is plain
    MAE (every weight 1), the same under both.
    """
    weights = mask if probs is None else mask * probs
    if norm == "count":
        return (errors * weights).sum() / mask.sum()
    if norm == "sum":
        return ((errors * weights).sum(1) / weights.sum(1).clamp_min(1e-12)).mean()
    raise ValueError(f"unknown Stage-I weight normalisation {norm!r} (count or sum)")

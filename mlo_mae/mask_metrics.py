"""Numbers that say whether T learned anything: how alike its masks are across images, how saturated
its probabilities are, and what uniformly random masks would give for comparison.

A T that collapsed to one image-independent mask has Jaccard 1 between any two
images' masked sets; uniformly random masks of K out of N patches have the
hypergeometric expectation ``random_jaccard(N, K)`` (0.60 for 48 of 64).
"""

from __future__ import annotations

import math

import torch

SATURATION = 0.01  # a probability below this or above 1 - this counts as saturated


def mean_pairwise_jaccard(masks: torch.Tensor) -> float:
    """Mean |A ∩ B| / |A ∪ B| over all pairs of different images of a (B, N) 0/1 mask batch."""
    m = masks.detach().double()
    b = m.shape[0]
    if b < 2:
        raise ValueError(f"the Jaccard index needs at least 2 masks, got {b}")
    inter = m @ m.T
    count = m.sum(1)
    union = count[:, None] + count[None, :] - inter
    jaccard = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))  # two empty sets: equal
    return float((jaccard.sum() - jaccard.diagonal().sum()) / (b * (b - 1)))


def random_jaccard(num_patches: int, num_masked: int) -> float:
    """Expected Jaccard index of two independent uniformly random K-subsets of N patches."""
    n, k = num_patches, num_masked
    total = math.comb(n, k)
    expected = 0.0
    for i in range(max(0, 2 * k - n), k + 1):  # i = size of the intersection (hypergeometric)
        weight = math.comb(k, i) * math.comb(n - k, k - i) / total
        expected += weight * (i / (2 * k - i) if 2 * k - i else 1.0)
    return expected


def saturated_fraction(probs: torch.Tensor, tolerance: float = SATURATION) -> float:
    """Share of probabilities below ``tolerance`` or above ``1 - tolerance``."""
    p = probs.detach()
    return float(((p < tolerance) | (p > 1 - tolerance)).double().mean())


def mean_masked_prob(probs: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean probability over the masked patches: the average Stage-I weight of a masked patch."""
    m = masks.detach().double()
    return float((probs.detach().double() * m).sum() / m.sum().clamp_min(1))


def mean_entropy(probs: torch.Tensor) -> float:
    """Mean binary entropy of the probabilities, in nats (ln 2 = 0.69 at p = 0.5, 0 when saturated)."""
    p = probs.detach().double().clamp(1e-12, 1 - 1e-12)
    return float(-(p * p.log() + (1 - p) * (1 - p).log()).mean())


def object_patches(statistic: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) 0/1: an image's object patches, the floor(N/2) with the highest pixel ``statistic`` (the one
    the masking rules rank by, ``masking.patch_statistic``), ties at random."""
    from .masking import order_by_statistic

    b, n = statistic.shape
    top = order_by_statistic(statistic, generator)[:, n - n // 2:]
    return torch.zeros(b, n, device=statistic.device).scatter_(1, top, 1.0)


def object_masked_share(objects: torch.Tensor, masks: torch.Tensor) -> float:
    """Share of the object patches that are masked, over a batch: k/N for masks blind to content
    (uniformly random), 1 when the object is masked first, lower when the background is."""
    objects = objects.detach().double()
    return float((objects * masks.detach().double()).sum() / objects.sum().clamp_min(1))


def weighted_error(errors: torch.Tensor, weights: torch.Tensor) -> float:
    """The Stage-I reconstruction error an image's masked patches carry, weighted as Stage I weighs them
    (sum of w * err over sum of w per image), averaged over images."""
    w = weights.detach().double()
    return float(((errors.detach().double() * w).sum(1) / w.sum(1).clamp_min(1e-12)).mean())

"""The masking network T and how its scores become a mask and a weighted loss.

Conventions (MAE's): ``mask`` is 1 for a masked (hidden, reconstructed) patch and
0 for a visible one; ``ids_keep`` are the visible patches, ``ids_restore`` puts
[visible, masked] back into image order.

Rounding: the number of masked patches is round-half-up(r * N), clamped to
[1, N - 1] so that at least one patch is hidden and one is seen. For r = 0.75
and N = 64 that is 48; for N = 196 it is 147.

How the k masked patches are chosen:
- from T's scores p (``mlo.selection``): ``topk`` the k highest (the paper); ``gumbel`` the k highest
  of log p + Gumbel noise, i.e. k patches drawn without replacement with chances proportional to p,
  so that every patch is masked, and learned from, now and then; ``mixed`` (HPM-style) the m highest
  (m = round(f * k), f ramped up from 0 by the caller) and k - m uniformly random others, which
  Stage I weights by 1, so that T can move at most m patches' weight and never turn Stage I off;
- without T (baseline runs, ``mlo.baseline_rule``): ``random`` (MAE), or by a per-patch pixel
  statistic, the standard deviation of the patch's input values: ``object-first`` masks the k most
  varied patches (object and edges first), ``background-first`` the k flattest; ties at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import MLOConfig
    from .mae import MaskedAutoencoderViT


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


SELECTIONS = ("topk", "mixed", "gumbel")  # mlo.selection: how T's scores choose the masked patches
RULES = ("random", "background-first", "object-first")  # mlo.baseline_rule: masks without T


@dataclass
class Mask:
    ids_keep: torch.Tensor  # (B, N - K) visible patches, lowest scores first
    ids_restore: torch.Tensor  # (B, N)
    mask: torch.Tensor  # (B, N), 1 = masked
    # (B, N) 1 where a masked patch was chosen by T's score and is weighted by it in Stage I; the other
    # masked patches weigh 1. None: every masked patch was chosen by T (topk, gumbel).
    learned: torch.Tensor | None = None


def _mask_from_order(order: torch.Tensor, k: int) -> Mask:
    """``order`` lists patches from most to least 'keep-worthy'; the last k are masked."""
    n = order.shape[1]
    ids_restore = torch.argsort(order, dim=1)
    mask = torch.ones(order.shape, device=order.device)
    mask[:, : n - k] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Mask(ids_keep=order[:, : n - k], ids_restore=ids_restore, mask=mask)


def _uniform(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) from ``generator`` (drawn on the CPU, where it lives) or else the global RNG on ``device``."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator).to(device)


def top_k_mask(probs: torch.Tensor, mask_ratio: float) -> Mask:
    """Mask the round(r*N) patches with the HIGHEST probability (hard choice, no gradient)."""
    k = num_masked(probs.shape[1], mask_ratio)
    order = torch.argsort(probs.detach(), dim=1, stable=True)  # ascending: kept first
    return _mask_from_order(order, k)


def random_mask(batch: int, num_patches: int, mask_ratio: float, device: torch.device,
                generator: torch.Generator | None = None) -> Mask:
    """MAE's uniformly random masking (baseline mode): same count, uniform choice."""
    k = num_masked(num_patches, mask_ratio)
    order = torch.argsort(_uniform((batch, num_patches), device, generator), dim=1)
    return _mask_from_order(order, k)


def gumbel_top_k_mask(probs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None) -> Mask:
    """Mask the k highest of log p + Gumbel noise: k patches drawn without replacement, each draw
    with chances proportional to p (Gumbel-top-k)."""
    k = num_masked(probs.shape[1], mask_ratio)
    u = _uniform(tuple(probs.shape), probs.device, generator).clamp(1e-12, 1 - 1e-12)
    keys = probs.detach().double().clamp_min(1e-300).log() - (-u.double().log()).log()
    return _mask_from_order(torch.argsort(keys, dim=1, stable=True), k)


def mixed_mask(probs: torch.Tensor, mask_ratio: float, learned_fraction: float,
               generator: torch.Generator | None = None) -> Mask:
    """The m = round(learned_fraction * k) patches of highest p (``learned``), and k - m drawn uniformly
    from the rest."""
    if not 0.0 <= learned_fraction <= 1.0:
        raise ValueError(f"learned_fraction must be in [0, 1], got {learned_fraction}")
    b, n = probs.shape
    k = num_masked(n, mask_ratio)
    m = int(math.floor(learned_fraction * k + 0.5))
    keys = _uniform((b, n), probs.device, generator)  # in [0, 1): the random part's order
    top = torch.argsort(probs.detach(), dim=1, descending=True, stable=True)[:, :m]
    learned = torch.zeros(b, n, device=probs.device).scatter_(1, top, 1.0)
    keys = torch.where(learned.bool(), torch.full_like(keys, 2.0), keys)  # T's m last: masked first
    out = _mask_from_order(torch.argsort(keys, dim=1, stable=True), k)
    out.learned = learned
    return out


def select_mask(probs: torch.Tensor, mask_ratio: float, selection: str = "topk", learned_fraction: float = 1.0,
                generator: torch.Generator | None = None) -> Mask:
    """T's scores -> the mask Stage I trains with, by ``selection`` (see the module docstring)."""
    if selection == "topk":
        return top_k_mask(probs, mask_ratio)
    if selection == "gumbel":
        return gumbel_top_k_mask(probs, mask_ratio, generator)
    if selection == "mixed":
        return mixed_mask(probs, mask_ratio, learned_fraction, generator)
    raise ValueError(f"unknown selection {selection!r} (choose from {', '.join(SELECTIONS)})")


def patch_statistic(patches: torch.Tensor) -> torch.Tensor:
    """(B, N, P) patch values -> (B, N) their standard deviation: 0 on a blank patch, high on edges
    and texture. Ranks within an image do not change under a per-image affine map of the pixels."""
    return patches.detach().float().std(dim=-1, unbiased=False)


def order_by_statistic(statistic: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) patch indices in ascending order of ``statistic``, ties in random order."""
    shuffle = torch.argsort(_uniform(tuple(statistic.shape), statistic.device, generator), dim=1)
    ranked = torch.argsort(torch.gather(statistic, 1, shuffle), dim=1, stable=True)
    return torch.gather(shuffle, 1, ranked)


def rule_mask(statistic: torch.Tensor, mask_ratio: float, rule: str,
              generator: torch.Generator | None = None) -> Mask:
    """A mask without T: ``random``, or the k patches of highest (``object-first``) or lowest
    (``background-first``) ``statistic``, ties at random."""
    b, n = statistic.shape
    if rule == "random":
        return random_mask(b, n, mask_ratio, statistic.device, generator)
    if rule not in RULES:
        raise ValueError(f"unknown masking rule {rule!r} (choose from {', '.join(RULES)})")
    order = order_by_statistic(statistic, generator)  # ascending: the last k are masked
    return _mask_from_order(order if rule == "object-first" else order.flip(1), num_masked(n, mask_ratio))


def stage1_weights(mask: torch.Tensor, probs: torch.Tensor | None, learned: torch.Tensor | None = None,
                   ) -> torch.Tensor:
    """Each patch's weight in Stage I: 0 if visible; p if masked by T's choice; 1 if masked otherwise
    (no T, or the random part of a ``mixed`` mask)."""
    if probs is None:
        return mask
    if learned is None:
        return mask * probs
    return mask * (learned * probs + (1.0 - learned))


def weighted_reconstruction_loss(errors: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor | None,
                                 norm: str = "count", learned: torch.Tensor | None = None) -> torch.Tensor:
    """Stage I loss: each masked patch's error weighted by its probability.

    ``norm="count"`` (the authors' code): sum over masked patches of p_i * err_i, divided by
    the number masked. Lowering every p lowers the loss and Stage I's effective step, so T
    can switch Stage I off. ``norm="sum"``: per image, the p-weighted mean of its masked
    errors (divided by the sum of p over its masked patches), averaged over images; T can
    only move weight between patches, and the loss has MAE's scale. ``probs=None`` is plain
    MAE (every weight 1), the same under both. ``learned``: see ``stage1_weights``.
    """
    weights = stage1_weights(mask, probs, learned)
    if norm == "count":
        return (errors * weights).sum() / mask.sum()
    if norm == "sum":
        return ((errors * weights).sum(1) / weights.sum(1).clamp_min(1e-12)).mean()
    raise ValueError(f"unknown Stage-I weight normalisation {norm!r} (count or sum)")


@torch.no_grad()
def masks_for(mae: MaskedAutoencoderViT, masknet: nn.Module | None, images: torch.Tensor, cfg: MLOConfig,
              learned_fraction: float = 1.0, generator: torch.Generator | None = None,
              ) -> tuple[torch.Tensor | None, Mask]:
    """T's scores p (None without T) and the mask Stage I trains with, for normalised ``images``, as the
    config ``cfg`` (``mlo.*``) says. Random parts (baseline masks, ties, Gumbel noise, ``mixed``) come
    from ``generator``, else from the global RNG."""
    if cfg.baseline:
        b, n = images.shape[0], mae.num_patches
        statistic = torch.zeros(b, n, device=images.device) if cfg.baseline_rule == "random" else \
            patch_statistic(mae.patchify(images))
        return None, rule_mask(statistic, cfg.mask_ratio, cfg.baseline_rule, generator)
    if masknet is None:
        raise ValueError("masks of an MLO run need the masking network T")
    probs = masknet(mae.embed_patches(images))
    return probs, select_mask(probs, cfg.mask_ratio, cfg.selection, learned_fraction, generator)


def rule_scores(mask: Mask, rule: str) -> torch.Tensor:
    """What a rule's masks rank by, as scores in [0, 1] whose k highest are the masked patches (for the
    heatmaps): k/N everywhere for ``random`` (blind to content), else the patch's place in the rule's order."""
    b, n = mask.mask.shape
    if rule == "random":
        return torch.full((b, n), float(mask.mask[0].sum()) / n, device=mask.mask.device)
    return mask.ids_restore.float() / max(n - 1, 1)

"""C: the classification head on the CLS token of the whole, unmasked image.

BatchNorm without affine parameters, dropout, Linear: MAE's linear-probe head.
The CLS feature of an MAE encoder varies little across images at first; the
normalisation lets Stage II learn within a short run. In eval mode the
normalisation is a fixed affine map, so the head folds into one Linear layer
(timm's ``head``, see ``mlo_mae.export``).

The running statistics that training accumulates lag behind the moving
encoder (measured: a running variance 98x the batch variance at iteration 30),
so evaluation and export first recompute them on the current encoder
(``recompute_statistics``, "precise BN"). Training itself normalises by batch
statistics and never reads them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """C's loss (L_II on D_tr, L_val on D_val) in at least fp32: bf16 logits are upcast, fp64 stays fp64."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)


class ClassificationHead(nn.Module):
    def __init__(self, embed_dim: int, num_classes: int, drop: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, d) encoder features -> (B, classes) logits from the CLS token."""
        return self.fc(self.drop(self.norm(features[:, 0])))

    @contextlib.contextmanager
    def frozen_statistics(self) -> Iterator[None]:
        """Normalise by batch statistics without updating the running ones.

        The hypergradient evaluates the head several times; only Stage II's
        training step should move the running statistics.
        """
        self.norm.track_running_stats = False
        try:
            yield
        finally:
            self.norm.track_running_stats = True

    @torch.no_grad()
    def recompute_statistics(self, features: torch.Tensor) -> None:
        """Precise BN: the running statistics become those of ``features`` ((B, 1 + N, d) encoder
        output, or (B, d) CLS features), as one BatchNorm update with momentum 1 would set them."""
        cls = features[:, 0] if features.dim() == 3 else features
        cls = cls.to(self.norm.running_mean.dtype)
        self.norm.running_mean.copy_(cls.mean(0))
        self.norm.running_var.copy_(cls.var(0, unbiased=True))
        self.norm.num_batches_tracked.add_(1)

    def folded_linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of one Linear equal to this head in eval mode."""
        scale = torch.rsqrt(self.norm.running_var + self.norm.eps)
        weight = self.fc.weight * scale
        bias = self.fc.bias - weight @ self.norm.running_mean
        return weight.detach().clone(), bias.detach().clone()

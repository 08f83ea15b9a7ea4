"""Periodic evaluation on a fixed D_val sample: the head's top-1 and what T masks (for heatmaps).

The sample is the same images at every evaluation, so the heatmaps of one run
(and of an MLO and a baseline run on the same data) can be compared step by
step. C is evaluated with its BatchNorm statistics recomputed on a fixed D_tr
sample under the current encoder (precise BN, see ``mlo_mae.head``), on a copy:
nothing here changes a parameter, a running statistic or the global RNG.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .engine import MLOEngine
from .head import ClassificationHead
from .heatmaps import MaskSnapshot, snapshot
from .mask_metrics import mean_masked_prob, mean_pairwise_jaccard, random_jaccard, saturated_fraction
from .masking import num_masked
from .modes import eval_mode

Normalize = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Evaluation:
    step: int
    val_top1: float  # C(E(x)) on the sample, eval mode, precise BN
    val_loss: float
    snapshot: MaskSnapshot
    head: ClassificationHead  # the C that was evaluated: precise statistics, eval mode
    random_jaccard: float  # what uniformly random masks of the same count give
    jaccard: float | None  # mean pairwise Jaccard of the masked sets across the sample (None: one image)
    saturated: float | None = None  # share of T's probabilities below 0.01 or above 0.99 (MLO only)
    mean_prob_masked: float | None = None  # mean of T's probabilities over masked patches (MLO only)

    def metrics(self) -> dict[str, float | None]:
        """The numbers under their MLflow names."""
        return {"eval/val_top1": self.val_top1, "eval/val_loss": self.val_loss, "mask/jaccard": self.jaccard,
                "mask/jaccard_random": self.random_jaccard, "mask/saturated_eval": self.saturated,
                "mask/mean_prob_masked_eval": self.mean_prob_masked}


def _batches(images: torch.Tensor, labels: torch.Tensor, normalize: Normalize, batch_size: int):
    for i in range(0, len(images), batch_size):
        yield i, *normalize(images[i: i + batch_size], labels[i: i + batch_size])


@torch.no_grad()
def precise_head(engine: MLOEngine, train_images: torch.Tensor, normalize: Normalize,
                 batch_size: int = 128) -> ClassificationHead:
    """A copy of C in eval mode whose BatchNorm statistics are those of the current encoder's CLS
    features on ``train_images`` (uint8, a fixed D_tr sample)."""
    labels = torch.zeros(len(train_images), dtype=torch.long)
    with eval_mode(engine.mae):
        cls = torch.cat([engine.mae.forward_features(x)[:, 0] for _, x, _ in
                         _batches(train_images, labels, normalize, batch_size)])
    head = copy.deepcopy(engine.head)
    head.recompute_statistics(cls)
    return head.eval()


@torch.no_grad()
def evaluate(engine: MLOEngine, images: torch.Tensor, labels: torch.Tensor, normalize: Normalize,
             train_images: torch.Tensor, batch_size: int = 128) -> Evaluation:
    """``images``: (B, 3, H, W) uint8 of the fixed D_val sample, ``train_images`` the fixed D_tr sample
    for C's statistics; ``normalize`` makes model inputs of them."""
    head = precise_head(engine, train_images, normalize, batch_size)
    correct, loss, parts = 0, 0.0, []
    with eval_mode(engine.mae, engine.masknet):
        for i, x, y in _batches(images, labels, normalize, batch_size):
            logits = head(engine.mae.forward_features(x)).float()
            correct += int((logits.argmax(-1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            display = images[i: i + batch_size].permute(0, 2, 3, 1).contiguous()
            parts.append(snapshot(engine.mae, engine.masknet, x, y, display, engine.cfg.mlo.mask_ratio,
                                  engine.cfg.mlo.baseline, engine.iteration, seed=engine.cfg.run.seed + i))
    snap = merge(parts)
    n = snap.masks.shape[1]
    mlo = not engine.cfg.mlo.baseline
    return Evaluation(step=engine.iteration, val_top1=correct / len(images), val_loss=loss / len(images),
                      snapshot=snap, head=head,
                      jaccard=mean_pairwise_jaccard(snap.masks) if len(images) > 1 else None,
                      random_jaccard=random_jaccard(n, num_masked(n, engine.cfg.mlo.mask_ratio)),
                      saturated=saturated_fraction(snap.probs) if mlo else None,
                      mean_prob_masked=mean_masked_prob(snap.probs, snap.masks) if mlo else None)


def merge(parts: list[MaskSnapshot]) -> MaskSnapshot:
    """One snapshot of the images of several (same step, same grid)."""
    first = parts[0]
    return MaskSnapshot(step=first.step, grid=first.grid, baseline=first.baseline,
                        probs=torch.cat([p.probs for p in parts]), masks=torch.cat([p.masks for p in parts]),
                        labels=torch.cat([p.labels for p in parts]), images=torch.cat([p.images for p in parts]))


def condensed(snap: MaskSnapshot) -> dict:
    """What the evolution GIF needs of a snapshot, small enough to keep in checkpoints."""
    return {"step": snap.step, "grid": list(snap.grid), "baseline": snap.baseline,
            "mean": snap.probs.mean(0), "frequency": snap.masks.mean(0)}


def expand(saved: dict) -> MaskSnapshot:
    """A one-'image' snapshot whose mean map and mask frequency are the saved ones."""
    n = saved["mean"].numel()
    return MaskSnapshot(step=int(saved["step"]), grid=tuple(saved["grid"]), baseline=bool(saved["baseline"]),
                        probs=saved["mean"].reshape(1, n).float(), masks=saved["frequency"].reshape(1, n).float(),
                        labels=torch.zeros(1, dtype=torch.long),
                        images=torch.zeros(1, 1, 1, 3, dtype=torch.uint8))

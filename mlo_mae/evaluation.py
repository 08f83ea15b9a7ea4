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
from .heatmaps import MaskSnapshot, record
from .mask_metrics import (
    mean_masked_prob,
    mean_pairwise_jaccard,
    object_masked_share,
    object_patches,
    random_jaccard,
    saturated_fraction,
    weighted_error,
)
from .masking import num_masked, patch_statistic, random_mask, stage1_weights
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
    object_masked: float | None = None  # share of the object patches (the more varied half) that are masked
    object_masked_random: float | None = None  # the same for content-blind masks: k/N
    recon_vs_random: float | None = None  # Stage-I-weighted reconstruction error of the run's masks / random's

    def metrics(self) -> dict[str, float | None]:
        """The numbers under their MLflow names."""
        return {"eval/val_top1": self.val_top1, "eval/val_loss": self.val_loss, "mask/jaccard": self.jaccard,
                "mask/jaccard_random": self.random_jaccard, "mask/saturated_eval": self.saturated,
                "mask/mean_prob_masked_eval": self.mean_prob_masked, "mask/object_masked": self.object_masked,
                "mask/object_masked_random": self.object_masked_random,
                "mask/recon_vs_random": self.recon_vs_random}


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
    for C's statistics; ``normalize`` makes model inputs of them.

    The masks are the ones Stage I would draw now (random parts from generators seeded by the run's seed
    and the batch, the same at every evaluation); beside them, uniformly random masks of the same images
    give the reference reconstruction error, and each image's object patches (its more varied half by
    ``masking.patch_statistic``, the statistic the pixel rules rank by) the object-masked share."""
    head = precise_head(engine, train_images, normalize, batch_size)
    mlo, mae = engine.cfg.mlo, engine.mae
    correct, loss, parts, objects = 0, 0.0, [], []
    errors = {"run": 0.0, "random": 0.0}
    with eval_mode(engine.mae, engine.masknet):
        for i, x, y in _batches(images, labels, normalize, batch_size):
            logits = head(mae.forward_features(x)).float()
            correct += int((logits.argmax(-1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            display = images[i: i + batch_size].permute(0, 2, 3, 1).contiguous()
            generator = torch.Generator().manual_seed(engine.cfg.run.seed + i)
            probs, mask = engine.choose_mask(x, generator)
            parts.append(record(mae, engine.iteration, probs, mask, mlo, y, display))
            reference = random_mask(len(x), mae.num_patches, mlo.mask_ratio, x.device, generator)
            for key, m, weights in (("run", mask, stage1_weights(mask.mask, probs, mask.learned)),
                                    ("random", reference, reference.mask)):
                errors[key] += len(x) * weighted_error(mae(x, m.ids_keep, m.ids_restore), weights)
            objects.append(object_patches(patch_statistic(mae.patchify(x)), generator).cpu())
    snap = merge(parts)
    n = snap.masks.shape[1]
    k = num_masked(n, mlo.mask_ratio)
    with_t = not mlo.baseline
    return Evaluation(step=engine.iteration, val_top1=correct / len(images), val_loss=loss / len(images),
                      snapshot=snap, head=head,
                      jaccard=mean_pairwise_jaccard(snap.masks) if len(images) > 1 else None,
                      random_jaccard=random_jaccard(n, k),
                      saturated=saturated_fraction(snap.probs) if with_t else None,
                      mean_prob_masked=mean_masked_prob(snap.probs, snap.masks) if with_t else None,
                      object_masked=object_masked_share(torch.cat(objects), snap.masks), object_masked_random=k / n,
                      recon_vs_random=errors["run"] / errors["random"] if errors["random"] > 0 else None)


def merge(parts: list[MaskSnapshot]) -> MaskSnapshot:
    """One snapshot of the images of several (same step, same grid)."""
    first = parts[0]
    return MaskSnapshot(step=first.step, grid=first.grid, baseline=first.baseline, label=first.label,
                        probs=torch.cat([p.probs for p in parts]), masks=torch.cat([p.masks for p in parts]),
                        labels=torch.cat([p.labels for p in parts]), images=torch.cat([p.images for p in parts]))


def condensed(snap: MaskSnapshot) -> dict:
    """What the evolution GIF needs of a snapshot, small enough to keep in checkpoints."""
    return {"step": snap.step, "grid": list(snap.grid), "baseline": snap.baseline, "label": snap.label,
            "mean": snap.probs.mean(0), "frequency": snap.masks.mean(0)}


def expand(saved: dict) -> MaskSnapshot:
    """A one-'image' snapshot whose mean map and mask frequency are the saved ones."""
    n = saved["mean"].numel()
    return MaskSnapshot(step=int(saved["step"]), grid=tuple(saved["grid"]), baseline=bool(saved["baseline"]),
                        label=saved.get("label"),
                        probs=saved["mean"].reshape(1, n).float(), masks=saved["frequency"].reshape(1, n).float(),
                        labels=torch.zeros(1, dtype=torch.long),
                        images=torch.zeros(1, 1, 1, 3, dtype=torch.uint8))

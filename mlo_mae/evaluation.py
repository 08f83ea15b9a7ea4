"""Periodic evaluation on a fixed D_val sample: the head's top-1 and what T masks (for heatmaps).

The sample is the same images at every evaluation, so the heatmaps of one run
(and of an MLO and a baseline run on the same data) can be compared step by
step. Nothing here changes a parameter, a running statistic or the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .engine import MLOEngine
from .heatmaps import MaskSnapshot, snapshot

Normalize = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Evaluation:
    step: int
    val_top1: float  # C(E(x)) on the sample, eval mode
    val_loss: float
    snapshot: MaskSnapshot


@torch.no_grad()
def evaluate(engine: MLOEngine, images: torch.Tensor, labels: torch.Tensor, normalize: Normalize,
             batch_size: int = 128) -> Evaluation:
    """``images``: (B, 3, H, W) uint8 of the fixed sample; ``normalize`` makes model inputs of them."""
    modules = (engine.mae, engine.head, engine.masknet)
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    correct, loss, parts = 0, 0.0, []
    try:
        for i in range(0, len(images), batch_size):
            x, y = normalize(images[i: i + batch_size], labels[i: i + batch_size])
            logits = engine.head(engine.mae.forward_features(x)).float()
            correct += int((logits.argmax(-1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            display = images[i: i + batch_size].permute(0, 2, 3, 1).contiguous()
            parts.append(snapshot(engine.mae, engine.masknet, x, y, display, engine.cfg.mlo.mask_ratio,
                                  engine.cfg.mlo.baseline, engine.iteration, seed=engine.cfg.run.seed + i))
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return Evaluation(step=engine.iteration, val_top1=correct / len(images), val_loss=loss / len(images),
                      snapshot=merge(parts))


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

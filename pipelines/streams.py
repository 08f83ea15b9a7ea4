"""What the three levels draw from: endless, normalised mini-batches of a prepared data set.

Stage I and Stage II read D_tr (each through its own stream, own order), Stage
III reads D_val. This module is shared by the Ray Data path and the plain
PyTorch path; it imports neither Ray nor the training code.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .manifest import PreparedDataset

# level -> (split, train-time augmentation?): D_val is the masking level's validation
# loss, so it is read the way it is evaluated.
LEVELS = {"mae": ("train", True), "head": ("train", True), "mask": ("val", False)}


@dataclass(frozen=True)
class StreamSpec:
    """How one level's stream is decoded: shared by the Ray Data and PyTorch readers."""

    split: str
    train: bool
    size: int
    mode: str  # rrc | pad-crop | none
    hflip: bool
    seed: int

    def transform_kwargs(self) -> dict:
        return dict(size=self.size, train=self.train, mode=self.mode, hflip=self.hflip, seed=self.seed)


def resolve_augment(name: str, img_size: int) -> str:
    """``auto``: the MAE RandomResizedCrop for ImageNet-sized inputs, pad-and-crop for small ones."""
    if name != "auto":
        return name
    return "rrc" if img_size >= 96 else "pad-crop"


def level_specs(data: PreparedDataset, img_size: int, augment: str, seed: int,
                augment_head: bool = True) -> dict[str, StreamSpec]:
    """How each level's stream is decoded. ``augment_head=False``: Stage II reads D_tr as it is evaluated
    (C then learns the features the evaluation and the hypergradient see, not shifted copies)."""
    mode = resolve_augment(augment, img_size)
    return {level: StreamSpec(split, train and (level != "head" or augment_head), img_size, mode,
                              data.hflip_preserves_label, seed * 3 + i)
            for i, (level, (split, train)) in enumerate(LEVELS.items())}


class Normalizer:
    """uint8 (N, 3, H, W) on any device -> float32 normalised by the D_tr channel statistics."""

    def __init__(self, mean, std, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True).float()
        return (images - self.mean) / self.std, labels.to(self.device, non_blocking=True)


def normalized(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], norm: Normalizer) -> Iterator:
    for images, labels in batches:
        yield norm(images, labels)

"""The built-in data set: scikit-learn's UCI handwritten digits, shipped in its wheel.

1,797 real 8x8 grey images (10 classes) become 3-channel images at the model's
resolution (bilinear upsampling), normalised to zero mean and unit variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .splits import SplitIndices, stratified_split

CLASS_NAMES = tuple(str(d) for d in range(10))


@dataclass
class ImageSplits:
    """Images (N, 3, H, W) float32 and labels (N,) int64 for each split."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    class_names: tuple[str, ...]
    indices: SplitIndices

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_digits_splits(img_size: int = 32, seed: int = 0) -> ImageSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    pixels = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(pixels, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    split = stratified_split(labels, seed)
    mean, std = images[split.train].mean(), images[split.train].std()  # D_tr statistics only
    images = (images - mean) / std
    y = torch.from_numpy(labels)

    def take(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(idx)
        return images[t], y[t]

    return ImageSplits(take(split.train), take(split.val), take(split.test), CLASS_NAMES, split)

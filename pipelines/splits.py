"""The method's fixed, stratified splits: test first, then D_tr 80% / D_val 20%."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

TEST_FRACTION = 0.2  # carved first, for sources without an official test split
VAL_FRACTION = 0.2  # D_val: the masking level's (Stage III) data


@dataclass(frozen=True)
class SplitIndices:
    train: np.ndarray  # D_tr: Stage I and Stage II
    val: np.ndarray  # D_val: Stage III
    test: np.ndarray  # final evaluation only

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def stratified_split(labels: np.ndarray, seed: int) -> SplitIndices:
    """Stable for a given (labels, seed); each split keeps the class proportions."""
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=TEST_FRACTION, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=VAL_FRACTION, stratify=labels[rest], random_state=seed)
    return SplitIndices(np.sort(train), np.sort(val), np.sort(test))

"""The method's fixed, stratified splits: test (official, or carved first), then D_tr 80% / D_val 20%.

Within each class, items are ranked by sha256(seed, content digest) and the
first ones go to test, the next to D_val. The split depends only on the seed
and each image's content: not on file names, listing order, other classes or
library versions, and adding images to a class moves few of the others.
"""

from __future__ import annotations

import hashlib

import numpy as np

TEST_FRACTION = 0.2  # carved first, for sources without an official test split
VAL_FRACTION = 0.2  # D_val: the masking level's (Stage III) data
SPLITS = ("train", "val", "test")


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def rank_key(seed: int, digest: str) -> bytes:
    return hashlib.sha256(f"{seed}:{digest}".encode()).digest()


def assign_splits(digests: list[str], labels: np.ndarray, official_test: np.ndarray, seed: int) -> np.ndarray:
    """Split name per item. ``official_test`` items are the test split and nothing else is, if any exist."""
    labels = np.asarray(labels)
    official_test = np.asarray(official_test, dtype=bool)
    carve_test = not official_test.any()
    out = np.where(official_test, "test", "train").astype(object)
    for label in np.unique(labels[~official_test]):
        members = np.flatnonzero((labels == label) & ~official_test)
        members = sorted(members.tolist(), key=lambda i: rank_key(seed, digests[i]))
        n_test = _round_half_up(TEST_FRACTION * len(members)) if carve_test else 0
        n_val = _round_half_up(VAL_FRACTION * (len(members) - n_test))
        for i in members[:n_test]:
            out[i] = "test"
        for i in members[n_test:n_test + n_val]:
            out[i] = "val"
    return out

"""The same shards through a plain PyTorch DataLoader: single-process use, evaluation, and comparison.

Files are dealt to DataLoader workers; each worker reads one row group at a
time, so memory holds at most a row group per worker.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .manifest import PreparedDataset
from .plan import open_shard, read_rows
from .streams import StreamSpec
from .transforms import transform_batch


class ParquetImages(IterableDataset):
    """Rows of one split as (uint8 image, label); shuffled by (seed, epoch) when ``shuffle``."""

    def __init__(self, data: PreparedDataset, spec: StreamSpec, shuffle: bool = True) -> None:
        self.files = data.files(spec.split)
        self.spec = spec
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _units(self) -> list[tuple[str, int]]:
        units = [(f, g) for f in self.files for g in range(open_shard(f).num_row_groups)]
        if self.shuffle:
            order = np.random.default_rng([self.spec.seed, self.epoch]).permutation(len(units))
            units = [units[i] for i in order]
        info = get_worker_info()
        return units[info.id::info.num_workers] if info else units

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for file, group in self._units():
            rows = read_rows(file, group)
            if self.shuffle:
                order = np.random.default_rng([self.spec.seed, self.epoch, group]).permutation(len(rows["id"]))
                rows = {k: v[order] for k, v in rows.items()}
            out = transform_batch(rows, epoch=self.epoch, **self.spec.transform_kwargs())
            for image, label in zip(out["image"], out["label"].tolist()):
                yield torch.from_numpy(image), label


def loader(data: PreparedDataset, spec: StreamSpec, batch_size: int, shuffle: bool = True,
           num_workers: int = 0, drop_last: bool = True) -> DataLoader:
    return DataLoader(ParquetImages(data, spec, shuffle), batch_size=batch_size, num_workers=num_workers,
                      drop_last=drop_last, persistent_workers=False)

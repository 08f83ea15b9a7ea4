"""Endless, reproducible, resumable mini-batches from tensors held in memory.

Each level draws from its own loader. The order of epoch ``e`` is a
permutation seeded by ``(seed, e)``, so the position in the stream is two
integers and a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch


class EndlessLoader(Iterator[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 device: torch.device | str = "cpu") -> None:
        if len(images) < batch_size:
            raise ValueError(f"batch size {batch_size} is larger than the split ({len(images)} images)")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.images), generator=gen).to(self.images.device)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > len(self.images):  # drop the ragged tail
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.position: self.position + self.batch_size]
        self.position += self.batch_size
        return self.images[idx], self.labels[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)

"""The Ray Data path: a rank's planned chunks -> read + decode/augment in Ray tasks -> the training worker.

Each training worker reads, for each level, the chunks its plan
(``pipelines.plan``) deals it, one short Ray Data execution per shuffle
window. Ray Data runs the reads and the decoding as tasks across the cluster
and returns the blocks in plan order; nothing is materialised beyond the
window being read and the batches read ahead. The worker shuffles each window
and cuts batches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np
import ray
import ray.data
import torch

from .plan import COLUMNS, RankPlan, Window, read_rows
from .streams import StreamSpec
from .transforms import transform_batch


def configure_data_context() -> None:
    """Blocks in submission order (the plan's order), and no progress bars fighting the training log."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def read_chunks(items: dict[str, np.ndarray], *, size: int, train: bool, mode: str, hflip: bool,
                seed: int) -> dict[str, np.ndarray]:
    """``map_batches`` body: read each item's row-group slice and decode it for its epoch."""
    parts = []
    for file, group, start, stop, epoch in zip(items["file"], items["group"], items["start"], items["stop"],
                                               items["epoch"]):
        rows = read_rows(file, int(group), int(start), int(stop))
        parts.append(transform_batch(rows, size=size, train=train, mode=mode, hflip=hflip, seed=seed,
                                     epoch=int(epoch)))
    return {k: np.concatenate([p[k] for p in parts]) for k in COLUMNS}


class LevelStream(Iterator):
    """(uint8 images, labels) batches of one rank's plan, from batch ``start_batch`` to ``stop_batch``.

    A background thread keeps up to ``depth`` batches ready, across window and
    epoch boundaries. Errors reach the consumer.
    """

    _END = object()

    def __init__(self, plan: RankPlan, spec: StreamSpec, batch_size: int, start_batch: int, stop_batch: int,
                 depth: int = 8) -> None:
        self.plan, self.spec, self.batch_size = plan, spec, batch_size
        self.start_batch, self.stop_batch = start_batch, stop_batch
        self.wait_s = 0.0  # time the consumer spent blocked on data
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="level-stream", daemon=True)
        self._thread.start()

    def _windows(self) -> tuple[list, int]:
        """The windows covering batches [start_batch, stop_batch), and the rows to skip in the first."""
        windows, skip = self.plan.start(self.start_batch * self.batch_size)
        needed = (self.stop_batch - self.start_batch) * self.batch_size + skip
        out = []
        for window in windows:
            if needed <= 0:
                break
            out.append(window)
            needed -= window.rows
        return out, skip

    def dataset(self, window: Window) -> ray.data.Dataset:
        """The Dataset that reads and decodes ``window``'s chunks, in order."""
        items = [{"file": c.file, "group": c.group, "start": c.start, "stop": c.stop, "epoch": window.epoch}
                 for c in window.chunks]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        return ds.map_batches(read_chunks, fn_kwargs=self.spec.transform_kwargs(), batch_size=1)

    def _blocks(self, windows: list[Window]) -> Iterator[dict[str, np.ndarray]]:
        """Decoded blocks of ``windows``, one short Ray Data execution per window.

        Ray Data 2.60's executor loop never sleeps while it is backpressured with no
        task running, which is most of the time behind a training loop: one long
        execution per stream cost a third of the training speed (measured). A
        window's execution ends as soon as its few tasks have run.
        """
        for window in windows:
            yield from self.dataset(window).iter_batches(batch_size=None, batch_format="numpy",
                                                           prefetch_batches=0)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            windows, skip = self._windows()
            blocks = self._blocks(windows)
            pending = _Rows()  # rows of the current window, in chunk order
            ready = _Rows()  # shuffled rows waiting to be batched
            remaining = self.stop_batch - self.start_batch
            for window in windows:
                while len(pending) < window.rows:
                    pending.add(next(blocks))
                rows = pending.take(window.rows).permuted(self.plan.order(window))
                ready.extend(rows.drop(skip))
                skip = 0
                while len(ready) >= self.batch_size and remaining > 0:
                    batch = ready.take(self.batch_size)
                    if not self._put((batch.images, batch.labels)):
                        return
                    remaining -= 1
            if remaining:
                raise RuntimeError(f"the {self.spec.split} stream ended {remaining} batches early")
            self._put((self._END, StopIteration()))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put((self._END, err))

    def __next__(self):
        started = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - started
        if item[0] is self._END:
            raise item[1]
        images, labels = item
        return torch.from_numpy(images), torch.from_numpy(labels)

    def close(self) -> None:
        self._stop.set()


class _Rows:
    """A growing list of decoded rows (image uint8 N x 3 x S x S, label) with cheap take/extend."""

    def __init__(self, images: np.ndarray | None = None, labels: np.ndarray | None = None) -> None:
        self._images = [] if images is None else [images]
        self._labels = [] if labels is None else [labels]
        self._n = 0 if images is None else len(images)

    def __len__(self) -> int:
        return self._n

    def add(self, block: dict[str, np.ndarray]) -> None:
        self._images.append(block["image"])
        self._labels.append(block["label"])
        self._n += len(block["label"])

    def extend(self, other: "_Rows") -> None:
        self._images += other._images
        self._labels += other._labels
        self._n += other._n

    def _joined(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self._images) != 1:
            self._images, self._labels = [np.concatenate(self._images)], [np.concatenate(self._labels)]
        return self._images[0], self._labels[0]

    def take(self, n: int) -> "_Rows":
        images, labels = self._joined()
        head = _Rows(images[:n], labels[:n])
        self._images, self._labels, self._n = [images[n:]], [labels[n:]], self._n - n
        return head

    def drop(self, n: int) -> "_Rows":
        images, labels = self._joined()
        return _Rows(images[n:], labels[n:])

    def permuted(self, order: np.ndarray) -> "_Rows":
        images, labels = self._joined()
        return _Rows(images[order], labels[order])

    @property
    def images(self) -> np.ndarray:
        return np.ascontiguousarray(self._joined()[0])

    @property
    def labels(self) -> np.ndarray:
        return np.ascontiguousarray(self._joined()[1])

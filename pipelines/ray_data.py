"""The Ray Data path: a rank's planned chunks -> read + decode/augment in Ray tasks -> the training worker.

Each training worker reads, for each level, the chunks its plan
(``pipelines.plan``) deals it: one short Ray Data execution per group of
shuffle windows (the first window alone, then doubling up to
``EXECUTION_BYTES`` of decoded images), the next group executing while the
worker consumes the current one. Ray Data runs the reads
and the decoding as tasks across the cluster and returns the blocks in plan
order; nothing is held beyond three groups and the batches read ahead. The
worker shuffles each window and cuts batches.
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


EXECUTION_BYTES = 32 * 2**20  # decoded images one Ray Data execution returns (at least one window)


def configure_data_context() -> None:
    """Blocks in submission order (the plan's order), and no progress bars fighting the training log.

    Per-operator resource reservation is off: with it, Ray Data 2.60 gave the decoding operator of these
    small executions a budget of one task's output, so its tasks ran one at a time, each only after the
    previous block was consumed (measured: 0.67 tasks running on average on 2 CPUs; 1.42 without it).
    Memory stays bounded by the executions' size (``EXECUTION_BYTES``), not by the reservation.
    """
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.op_resource_reservation_enabled = False
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

    def dataset(self, windows: list[Window]) -> ray.data.Dataset:
        """The Dataset that reads and decodes the chunks of ``windows``, in order."""
        items = [{"file": c.file, "group": c.group, "start": c.start, "stop": c.stop, "epoch": window.epoch}
                 for window in windows for c in window.chunks]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        return ds.map_batches(read_chunks, fn_kwargs=self.spec.transform_kwargs(), batch_size=1)

    def _groups(self, windows: list[Window]) -> Iterator[list[Window]]:
        """Windows grouped into executions: the first window alone (the first batch waits for one window
        only), then each group twice the last, up to ``EXECUTION_BYTES`` of decoded images."""
        row_bytes = 3 * self.spec.size**2
        group: list[Window] = []
        size = budget = 0
        for window in windows:
            group.append(window)
            size += window.rows * row_bytes
            if size >= budget:
                yield group
                group = []
                budget = min(2 * max(budget, size), EXECUTION_BYTES)
                size = 0
        if group:
            yield group

    def _execute(self, windows: list[Window]) -> list[dict[str, np.ndarray]]:
        """Every decoded block of ``windows``, read to the end at once: an execution left half-read is
        backpressured, and Ray Data 2.60's executor loop never sleeps then (one long execution per
        stream cost a third of the training speed, measured)."""
        return list(self.dataset(windows).iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0))

    def _blocks(self, windows: list[Window]) -> Iterator[dict[str, np.ndarray]]:
        """Decoded blocks of ``windows`` in order; the next group executes while this one is consumed.

        The reader is a daemon thread (not an executor): a stream dropped mid-run must not hold up the
        interpreter's exit waiting for an execution on a cluster that may be gone."""
        ready: queue.Queue = queue.Queue(maxsize=1)

        def read() -> None:
            for group in self._groups(windows):
                try:
                    result = self._execute(group)
                except BaseException as err:  # noqa: BLE001 - handed to the consumer
                    result = err
                if not self._offer(ready, result) or isinstance(result, BaseException):
                    return
            self._offer(ready, None)

        threading.Thread(target=read, name="level-stream-read", daemon=True).start()
        while not self._stop.is_set():
            try:
                result = ready.get(timeout=0.5)
            except queue.Empty:
                continue
            if result is None:
                return
            if isinstance(result, BaseException):
                raise result
            yield from result

    def _offer(self, target: queue.Queue, item) -> bool:
        """Put ``item`` into ``target`` unless the stream is closed first."""
        while not self._stop.is_set():
            try:
                target.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _put(self, item) -> bool:
        return self._offer(self._queue, item)

    def _produce(self) -> None:
        try:
            windows, skip = self._windows()
            blocks = self._blocks(windows)
            pending = _Rows()  # rows of the current window, in chunk order
            ready = _Rows()  # shuffled rows waiting to be batched
            remaining = self.stop_batch - self.start_batch
            for window in windows:
                while len(pending) < window.rows:
                    block = next(blocks, None)
                    if block is None:  # closed, or the executions returned fewer rows than planned
                        if self._stop.is_set():
                            return
                        raise RuntimeError(f"the {self.spec.split} stream ended {remaining} batches early")
                    pending.add(block)
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

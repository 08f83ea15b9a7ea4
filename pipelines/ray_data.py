"""The Ray Data path: shards -> ``read_parquet`` -> decode/augment in ``map_batches`` -> training workers.

Each level gets its own Dataset (Ray Train splits every one of them across
the workers with ``get_dataset_shard``). Nothing is materialised: blocks
stream through the object store under Ray Data's backpressure, so memory is
bounded by the pipeline's in-flight blocks, not by the size of the data set.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

import ray
import ray.data

from .manifest import PreparedDataset
from .streams import StreamSpec
from .transforms import decode_for_ray

MAP_BATCH_ROWS = 64  # rows per decode task batch: small enough to keep blocks light for 224 px images


def configure_data_context() -> None:
    """Deterministic order for a given seed, and no progress bars fighting the training log."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-read size estimates at INFO
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # The V2 Parquet reader lists files through actors that are started and killed on every
    # execution (every epoch): on a small machine that churn costs more than the decoding.
    ctx.use_datasource_v2 = False


def level_dataset(data: PreparedDataset, spec: StreamSpec) -> ray.data.Dataset:
    """One level's stream: the split's shards in a per-epoch shuffled order, decoded and augmented."""
    ds = ray.data.read_parquet(data.files(spec.split), columns=["image", "label", "id"],
                               shuffle=ray.data.FileShuffleConfig(seed=spec.seed))
    return ds.map_batches(decode_for_ray, fn_kwargs=spec.transform_kwargs(), batch_size=MAP_BATCH_ROWS)


class EndlessStream(Iterator):
    """(uint8 images, labels) from a DataIterator, epoch after epoch, read ahead by a background thread.

    Starting each epoch's execution takes Ray Data seconds; without read-ahead a
    small split (D_val of a few hundred images) would stall training at every
    epoch boundary. The thread keeps up to ``depth`` batches ready, across
    boundaries. Ragged tails are dropped; errors reach the consumer.
    """

    _END = object()

    def __init__(self, shard, batch_size: int, seed: int, depth: int = 8) -> None:
        self._shard, self._batch_size, self._seed = shard, batch_size, seed
        self._buffer = max(8 * batch_size, 256)  # rows of the local shuffle buffer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="level-stream", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        import torch

        epoch = 0
        try:
            while not self._stop.is_set():
                drawn = 0
                for batch in self._shard.iter_torch_batches(
                        batch_size=self._batch_size, drop_last=True, local_shuffle_buffer_size=self._buffer,
                        local_shuffle_seed=(self._seed * 100_003 + epoch) % 2**32, prefetch_batches=2,
                        dtypes={"image": torch.uint8, "label": torch.int64, "id": torch.int64}):
                    drawn += 1
                    if not self._put((batch["image"], batch["label"])):
                        return
                if drawn == 0:
                    raise ValueError(f"a stream yielded no batch of {self._batch_size}: the split (per "
                                     "worker) is smaller than the batch size")
                epoch += 1
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put((self._END, err))

    def __next__(self):
        item = self._queue.get()
        if item[0] is self._END:
            raise item[1]
        return item

    def close(self) -> None:
        self._stop.set()

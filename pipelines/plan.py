"""Which rows each worker reads, in which order: a pure function of (split, seed, rank, world size).

Ray Data has no resumable iterator, and its own per-epoch reshuffling keys off
a private execution counter that restarts in every new process. So the order
is planned here, explicitly, and Ray Data only executes the plan:

- A split is cut into *chunks*: Parquet row groups, sliced further when the
  split is small, so that every worker gets several chunks per epoch.
- Epoch ``e`` permutes the chunks with ``rng(seed, e)`` and deals them in that
  order, each to the rank with the fewest rows so far: every row is read once
  per epoch, by one rank, and shares differ by at most one chunk.
- A rank's chunks are grouped into *windows* of about ``window_rows`` rows; the
  rows of a window are shuffled together with ``rng(seed, e, rank, window)``.
- A rank's stream is its windows, epoch after epoch, cut into batches that
  may straddle windows and epochs. So the position after ``k`` batches is
  simply ``k * batch_size`` rows: a checkpoint needs no more than the number of
  batches each level has drawn, and resuming re-reads at most one window.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from .location import filesystem, is_uri
from .manifest import DatasetError

MIN_CHUNKS_PER_RANK = 4
COLUMNS = ["image", "label", "id"]  # what the readers need of a shard


@dataclass(frozen=True)
class Chunk:
    """Rows ``start:stop`` of row group ``group`` of ``file``."""

    file: str
    group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Window:
    """Consecutive chunks of one rank's epoch whose rows are shuffled together."""

    epoch: int
    index: int
    chunks: tuple[Chunk, ...]

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.chunks)


def open_shard(file: str) -> pq.ParquetFile:
    """A prepared shard (a local file or an object); an unreadable one is a one-line ``DatasetError`` naming it."""
    try:
        if is_uri(file):
            fs, path = filesystem(file)
            return pq.ParquetFile(fs.open_input_file(path))
        return pq.ParquetFile(file)
    except (OSError, ValueError) as err:  # ArrowInvalid is a ValueError
        raise DatasetError(f"shard '{file}' cannot be read ({' '.join(str(err).split())[:160]}); "
                           "prepare the data set again") from None


def read_rows(file: str, group: int, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
    """Rows ``start:stop`` of one row group, column by column (encoded images, labels, ids)."""
    table = open_shard(file).read_row_group(group, columns=COLUMNS)
    table = table.slice(start, (table.num_rows if stop is None else stop) - start)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in COLUMNS}


def list_chunks(files: Sequence[str], world: int) -> list[Chunk]:
    """Row groups of ``files``, sliced so that each of ``world`` ranks gets a few chunks per epoch."""
    groups = []
    for file in files:
        meta = open_shard(file).metadata
        groups += [(file, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    total = sum(n for *_, n in groups)
    limit = max(1, total // (MIN_CHUNKS_PER_RANK * world))
    chunks = []
    for file, group, n in groups:
        pieces = math.ceil(n / limit)
        bounds = [round(i * n / pieces) for i in range(pieces + 1)]
        chunks += [Chunk(file, group, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    return chunks


class RankPlan:
    """One rank's view of one level's stream (see the module docstring)."""

    def __init__(self, chunks: Sequence[Chunk], seed: int, rank: int, world: int, window_rows: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        if len(chunks) < world:
            raise ValueError(f"{len(chunks)} chunks cannot be dealt to {world} workers")
        self.chunks, self.seed, self.rank, self.world = list(chunks), seed, rank, world
        self.window_rows = window_rows

    def epoch_chunks(self, epoch: int) -> list[Chunk]:
        """This rank's chunks of ``epoch``, in reading order."""
        order = np.random.default_rng([self.seed % 2**63, epoch]).permutation(len(self.chunks))
        totals = [0] * self.world
        mine = []
        for i in order:
            rank = min(range(self.world), key=totals.__getitem__)  # ties: the lowest rank
            totals[rank] += self.chunks[i].rows
            if rank == self.rank:
                mine.append(self.chunks[i])
        return mine

    def windows(self, epoch: int) -> list[Window]:
        out, current = [], []
        for chunk in self.epoch_chunks(epoch):
            current.append(chunk)
            if sum(c.rows for c in current) >= self.window_rows:
                out.append(Window(epoch, len(out), tuple(current)))
                current = []
        if current:
            out.append(Window(epoch, len(out), tuple(current)))
        return out

    def order(self, window: Window) -> np.ndarray:
        """The permutation applied to a window's rows (in chunk order)."""
        rng = np.random.default_rng([self.seed % 2**63, window.epoch, self.rank, window.index])
        return rng.permutation(window.rows)

    def start(self, row: int) -> tuple[Iterator[Window], int]:
        """The windows from the one holding stream row ``row`` on, and how many of its rows to skip."""
        epoch = 0
        while True:
            for window in self.windows(epoch):
                if row < window.rows:
                    return self._from(window), row
                row -= window.rows
            epoch += 1

    def _from(self, first: Window) -> Iterator[Window]:
        epoch = first.epoch
        yield from self.windows(epoch)[first.index:]
        while True:
            epoch += 1
            yield from self.windows(epoch)

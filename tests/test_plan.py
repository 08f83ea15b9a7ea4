"""The data plan (no Ray): every row once per epoch across ranks, balanced, and resumable by row count."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.plan import MIN_CHUNKS_PER_RANK, RankPlan, list_chunks


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """Three shards of 50, 37 and 13 rows (ids 0..99) in row groups of 16."""
    root = tmp_path_factory.mktemp("shards")
    out, start = [], 0
    for k, n in enumerate((50, 37, 13)):
        path = root / f"part-{k}.parquet"
        pq.write_table(pa.table({"id": np.arange(start, start + n)}), path, row_group_size=16)
        out.append(str(path))
        start += n
    return out


def _ids(chunks) -> list[int]:
    ids = []
    for c in chunks:
        table = pq.ParquetFile(c.file).read_row_group(c.group, columns=["id"])
        ids += table.column("id").to_pylist()[c.start:c.stop]
    return ids


def _stream(plan: RankPlan, row: int, n: int) -> list[int]:
    """``n`` ids of the rank's stream from stream row ``row``, by the plan's own rules."""
    windows, skip = plan.start(row)
    out: list[int] = []
    for window in windows:
        ids = np.array(_ids(window.chunks))[plan.order(window)].tolist()
        out += ids[skip:]
        skip = 0
        if len(out) >= n:
            return out[:n]
    raise AssertionError("unreachable: the stream is endless")


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_each_epoch_deals_every_row_once_in_balanced_shares(files, world):
    chunks = list_chunks(files, world)
    assert sorted(_ids(chunks)) == list(range(100))
    assert len(chunks) >= MIN_CHUNKS_PER_RANK * world or max(c.rows for c in chunks) == 1
    plans = [RankPlan(chunks, seed=7, rank=r, world=world, window_rows=20) for r in range(world)]
    largest = max(c.rows for c in chunks)
    for epoch in range(3):
        dealt = [_ids(p.epoch_chunks(epoch)) for p in plans]
        assert sorted(sum(dealt, [])) == list(range(100))
        sizes = [len(d) for d in dealt]
        assert max(sizes) - min(sizes) <= largest
        for p in plans:  # windows cover the epoch's chunks in order, each about window_rows
            windows = p.windows(epoch)
            assert [c for w in windows for c in w.chunks] == p.epoch_chunks(epoch)
            assert all(w.rows >= 20 for w in windows[:-1])


def test_orders_follow_seed_and_epoch(files):
    chunks = list_chunks(files, 2)
    plan = RankPlan(chunks, seed=1, rank=0, world=2, window_rows=20)
    assert _stream(plan, 0, 60) == _stream(RankPlan(chunks, 1, 0, 2, 20), 0, 60)
    assert _stream(plan, 0, 60) != _stream(RankPlan(chunks, 2, 0, 2, 20), 0, 60)
    assert plan.epoch_chunks(0) != plan.epoch_chunks(1)


@pytest.mark.parametrize("row", [0, 1, 19, 20, 49, 50, 51, 117, 333])
def test_a_stream_started_at_a_row_continues_the_full_stream(files, row):
    plan = RankPlan(list_chunks(files, 2), seed=3, rank=1, world=2, window_rows=20)
    full = _stream(plan, 0, row + 40)
    assert _stream(plan, row, 40) == full[row:]


def test_too_few_chunks_for_the_workers_is_refused(files):
    with pytest.raises(ValueError, match="cannot be dealt to 200 workers"):
        RankPlan(list_chunks(files, 1)[:3], seed=0, rank=0, world=200, window_rows=8)

"""The explicit all-reduce against a single process (no Ray): two gloo ranks on half batches each
must update E and D exactly as one process on the whole batches, in float64."""

from __future__ import annotations


import pytest
import torch
import torch.multiprocessing as mp

from conftest import random_batches, tiny_model
from mlo_mae.config import resolve
from mlo_mae.engine import MLOEngine
from shared_runs import free_port

FULL = 8


def _cfg():
    cfg = resolve(overrides={"optim.lr_scaling": "none"})
    cfg.model = tiny_model()
    return cfg


def _streams(rank: int, world: int) -> dict:
    """Each level's stream: the same full batches, rank r taking its contiguous share."""
    share = FULL // world

    def part(seed):
        for x, y in random_batches(seed, FULL, dtype=torch.float64):
            yield x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]

    return {level: part(i) for i, level in enumerate(("mae", "head", "mask"))}


def _rank_main(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    from mlo_mae.distributed import allreduce_mean, module_digest

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    engine = MLOEngine(_cfg(), 3, total_steps=4, sync=allreduce_mean, dtype=torch.float64, rank=rank,
                       world_size=world)
    streams = _streams(rank, world)
    stats = engine.step(streams)
    first = {k: v.numpy().copy() for k, v in engine.mae.state_dict().items()}  # numpy: no shared-memory handles
    grads = {n: p.grad.numpy().copy() for n, p in engine.mae.named_parameters() if p.grad is not None}
    engine.step(streams)
    digests = {name: module_digest(getattr(engine, name)) for name in ("mae", "head", "masknet")}
    out.put((rank, first, grads, stats.loss_mae, digests))
    dist.destroy_process_group()


def test_two_ranks_on_half_batches_update_like_one_process_on_whole_batches():
    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((out.get(timeout=300) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    alone = MLOEngine(_cfg(), 3, total_steps=4, dtype=torch.float64)
    stats = alone.step(_streams(0, 1))
    for rank, first, grads, loss_mae, digests in results:
        # Stage I alone moves E and D in the first iteration: the averaged gradient (AdamW would hide
        # a wrong scale, so it is compared itself) and the update are the whole batch's.
        assert loss_mae == pytest.approx(stats.loss_mae, rel=1e-12, abs=0)
        for name, p in alone.mae.named_parameters():
            if p.grad is not None:
                assert torch.allclose(torch.from_numpy(grads[name]), p.grad, rtol=1e-9, atol=1e-14), name
        for key, value in alone.mae.state_dict().items():
            assert torch.allclose(torch.from_numpy(first[key]), value, rtol=0, atol=1e-12), key
    assert results[0][4] == results[1][4]  # after two full iterations the replicas are bit-identical

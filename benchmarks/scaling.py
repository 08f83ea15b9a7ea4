"""Data-parallel scaling: images/s with 1 and 2 workers (one torch thread each), and the ratio.

Two setups, same ``tiny`` preset, same per-worker batch (so 2 workers process
twice the images per iteration):

- ``ray``: the real pipeline, ``training.launch.run_pretrain`` (Ray Train
  workers, Ray Data streams from the prepared digits, explicit all-reduce),
  on a local Ray cluster. The rate is taken between the progress lines of
  step ``--skip`` and the last step (lines every 5 steps), so start-up and
  stream warm-up are excluded; lines reach the driver through a queue polled
  every 0.5 s.
- ``compute``: the same engine and all-reduce in plain processes
  (``torch.distributed`` gloo) on synthetic batches already in memory: the
  ceiling without data loading and without Ray.

Usage: python benchmarks/scaling.py [--steps 40] [--skip 5] [--batch 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LOG_EVERY = 5  # progress lines (and Ray Train metric reports) every 5 iterations, as a user would


def _cfg(steps: int, batch: int):
    from mlo_mae.config import resolve

    return resolve(preset="tiny", overrides={
        "run.max_steps": steps, "run.threads": 1, "run.log_every": LOG_EVERY, "run.probe": False,
        "run.checkpoint_every": 0, "data.batch_mae": batch, "data.batch_head": batch, "data.batch_mask": batch})


def ray_rate(workers: int, steps: int, skip: int, batch: int) -> float:
    """Images/s of the full Ray Train + Ray Data pipeline between step ``skip`` and the last."""
    from pipelines.catalog import open_dataset
    from training.launch import Launch, run_pretrain

    cfg = _cfg(steps, batch)
    data = open_dataset("digits")
    seen: dict[int, float] = {}

    def echo(line: str) -> None:
        if line.startswith("step "):
            seen[int(line.split()[1].split("/")[0])] = time.perf_counter()

    with tempfile.TemporaryDirectory() as storage:
        run_pretrain(cfg, data, Launch(name=f"scaling-{workers}", storage_path=storage, workers=workers), echo)
    iterations = steps - skip
    return iterations * batch * cfg.mlo.unroll_mae * workers / (seen[steps] - seen[skip])


def _compute_worker(rank: int, world: int, port: int, steps: int, skip: int, batch: int, out) -> None:
    import torch
    import torch.distributed as dist

    from mlo_mae.distributed import allreduce_mean, no_sync
    from mlo_mae.engine import MLOEngine

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = _cfg(steps, batch)
    engine = MLOEngine(cfg, 10, steps, sync=allreduce_mean if world > 1 else no_sync, rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    pool = [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(4)]

    def endless(offset):
        i = offset
        while True:
            yield pool[i % len(pool)]
            i += 1

    streams = {"mae": endless(0), "head": endless(1), "mask": endless(2)}
    for _ in range(skip):
        engine.step(streams)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps - skip):
        engine.step(streams)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        out.put((steps - skip) * batch * cfg.mlo.unroll_mae * world / (time.perf_counter() - start))


def compute_rate(workers: int, steps: int, skip: int, batch: int) -> float:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_compute_worker, args=(r, workers, port, steps, skip, batch, out))
             for r in range(workers)]
    for p in procs:
        p.start()
    rate = out.get(timeout=1800)
    for p in procs:
        p.join()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="warm-up iterations left out of the rate")
    parser.add_argument("--batch", type=int, default=32, help="per worker, every level")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling.json")
    args = parser.parse_args()
    if args.skip % LOG_EVERY or args.steps % LOG_EVERY or args.skip >= args.steps:
        parser.error(f"--skip and --steps must be multiples of {LOG_EVERY}, --skip < --steps")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    rows = []
    for setup, measure in (("compute", compute_rate), ("ray", ray_rate)):
        rates = {w: measure(w, args.steps, args.skip, args.batch) for w in (1, 2)}
        rows.append({"setup": setup, "img_s_1": rates[1], "img_s_2": rates[2], "ratio": rates[2] / rates[1]})
    print(f"tiny preset, batch {args.batch} per worker per level, 1 torch thread per worker, "
          f"{os.cpu_count()} CPUs; steps {args.skip + 1}-{args.steps} timed")
    print(f"{'setup':<8} {'1 worker img/s':>15} {'2 workers img/s':>16} {'ratio':>6}")
    for row in rows:
        print(f"{row['setup']:<8} {row['img_s_1']:>15.1f} {row['img_s_2']:>16.1f} {row['ratio']:>6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "batch": args.batch, "steps": args.steps,
                                    "skip": args.skip, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

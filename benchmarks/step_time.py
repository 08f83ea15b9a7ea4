"""Time per Stage-I step of MLO-MAE vs plain MAE (baseline mode), and peak RSS.

The comparison model is the ``tiny`` preset: 32x32 input, patch 4 (64 patches),
encoder 192 wide x 4 deep x 3 heads, decoder 128 x 2 x 4, masking network
64*192 -> 512 -> 64; unroll 2/1/1; the same batch size at every level.

- MAE: the median time of one baseline Stage-I step (random masking, no T).
- MLO: the median time of one full iteration (2 Stage-I steps, Stage II,
  Stage III with the hypergradient) divided by the 2 Stage-I steps it holds.

Each (mode, batch) runs in its own process so that peak RSS is its own.
Usage: python benchmarks/step_time.py [--steps 30] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(mode: str, batch: int, steps: int, threads: int, warmup: int) -> dict:
    """Runs in a subprocess: build the engine, warm up, time ``steps`` steps."""
    sys.path.insert(0, str(ROOT))
    import torch

    from mlo_mae.config import resolve
    from mlo_mae.engine import MLOEngine

    torch.set_num_threads(threads)
    cfg = resolve(preset="tiny", overrides={"mlo.baseline": mode == "mae", "data.batch_mae": batch,
                                            "data.batch_head": batch, "data.batch_mask": batch})
    engine = MLOEngine(cfg, num_classes=10, total_steps=10 * (steps + warmup))
    gen = torch.Generator().manual_seed(0)
    pool = [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(8)]

    def cycle(offset: int):
        i = offset
        while True:
            yield pool[i % len(pool)]
            i += 1

    rss_ready = _rss_mb()
    times = []
    if mode == "mae":
        for i in range(warmup + steps):
            images = pool[i % len(pool)][0]
            start = time.perf_counter()
            engine.mae_step(images)
            times.append(time.perf_counter() - start)
        per_stage1 = times[warmup:]
    else:
        batches = {"mae": cycle(0), "head": cycle(3), "mask": cycle(5)}
        for _ in range(warmup + steps):
            start = time.perf_counter()
            engine.step(batches)
            times.append(time.perf_counter() - start)
        per_stage1 = [t / cfg.mlo.unroll_mae for t in times[warmup:]]
    return {"mode": mode, "batch": batch, "steps": steps, "threads": threads,
            "median_s_per_stage1_step": statistics.median(per_stage1),
            "p10_s": sorted(per_stage1)[len(per_stage1) // 10],
            "p90_s": sorted(per_stage1)[(9 * len(per_stage1)) // 10],
            "rss_ready_mb": rss_ready, "peak_rss_mb": _rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode (>= 30)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_time.json")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.steps, args.threads, args.warmup)))
        return

    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for mode in ("mae", "mlo"):
            print(f"running {mode} at batch {batch} ...", file=sys.stderr, flush=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(batch),
                                  "--steps", str(args.steps), "--warmup", str(args.warmup),
                                  "--threads", str(args.threads)],
                                 capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    table = []
    for batch in sorted({r["batch"] for r in rows}):
        mae = next(r for r in rows if r["batch"] == batch and r["mode"] == "mae")
        mlo = next(r for r in rows if r["batch"] == batch and r["mode"] == "mlo")
        table.append({
            "batch": batch,
            "mae_ms": 1000 * mae["median_s_per_stage1_step"],
            "mlo_ms": 1000 * mlo["median_s_per_stage1_step"],
            "time_ratio": mlo["median_s_per_stage1_step"] / mae["median_s_per_stage1_step"],
            "mae_peak_rss_mb": mae["peak_rss_mb"],
            "mlo_peak_rss_mb": mlo["peak_rss_mb"],
            "rss_ratio": mlo["peak_rss_mb"] / mae["peak_rss_mb"],
            "rss_ratio_above_ready": (mlo["peak_rss_mb"] - mlo["rss_ready_mb"])
            / max(mae["peak_rss_mb"] - mae["rss_ready_mb"], 1e-9),
        })
    header = (f"{'batch':>5} | {'MAE ms/step':>11} | {'MLO ms/step':>11} | {'MLO/MAE':>7} | "
              f"{'MAE RSS MB':>10} | {'MLO RSS MB':>10} | {'RSS ratio':>9} | {'growth ratio':>12}")
    print(header)
    print("-" * len(header))
    for r in table:
        print(f"{r['batch']:>5} | {r['mae_ms']:>11.1f} | {r['mlo_ms']:>11.1f} | {r['time_ratio']:>6.2f}x | "
              f"{r['mae_peak_rss_mb']:>10.0f} | {r['mlo_peak_rss_mb']:>10.0f} | {r['rss_ratio']:>8.2f}x | "
              f"{r['rss_ratio_above_ready']:>11.2f}x")
    print("MLO ms/step = one iteration (2 Stage-I, Stage II, Stage III) / 2; growth = peak RSS minus RSS "
          "after building the engine")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "table": table}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

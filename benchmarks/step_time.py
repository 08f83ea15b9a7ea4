"""Time per Stage-I step of MLO-MAE (this project's defaults and the paper's recipe) vs plain MAE, and
peak RSS.

The comparison model is the ``tiny`` preset: 32x32 input, patch 4 (64 patches),
encoder 192 wide x 4 deep x 3 heads, decoder 128 x 2 x 4; the same batch size
at every level. Recipes: ``mlo`` the defaults (patch scorer T, unroll 2/4/1,
Stage II reusing the kept features of earlier batches), ``paper`` (``--config
paper``: T 64*192 -> 512 -> 64, unroll 2/1/1).

- MAE: the median time of one baseline Stage-I step (random masking, no T).
- MLO: the median time of one full iteration (2 Stage-I steps, Stage II,
  Stage III with the hypergradient) divided by the 2 Stage-I steps it holds.

Times: all modes in one process, interleaved step by step (noise hits them
alike). Peak RSS: each mode in a process of its own.
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


def _setup(batch: int, threads: int):
    sys.path.insert(0, str(ROOT))
    import torch

    from mlo_mae.config import resolve
    from mlo_mae.engine import MLOEngine

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    pool = [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(8)]

    def make(mode: str):
        cfg = resolve("paper" if mode == "paper" else None, preset="tiny", overrides={
            "mlo.baseline": mode == "mae", "data.batch_mae": batch, "data.batch_head": batch,
            "data.batch_mask": batch})
        return MLOEngine(cfg, num_classes=10, total_steps=100_000)

    def cycle(offset: int):
        i = offset
        while True:
            yield pool[i % len(pool)]
            i += 1

    def runner(mode: str):
        """A zero-argument callable doing one timed unit: a MAE step or an MLO iteration."""
        engine = make(mode)
        if mode == "mae":
            stream = cycle(0)
            return lambda: engine.mae_step(next(stream)[0])
        batches = {"mae": cycle(0), "head": cycle(3), "mask": cycle(5)}
        return lambda: engine.step(batches)

    return runner


MODES = ("mae", "mlo", "paper")


def child_time(batch: int, steps: int, threads: int, warmup: int) -> dict:
    """Every mode in one process, interleaved step by step, so machine noise hits them alike."""
    runner = _setup(batch, threads)
    run = {mode: runner(mode) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(warmup + steps):
        for mode in MODES:
            start = time.perf_counter()
            run[mode]()
            if i >= warmup:
                times[mode].append(time.perf_counter() - start)
    out = {"batch": batch, "steps": steps, "threads": threads, "mae_s": statistics.median(times["mae"])}
    for mode in ("mlo", "paper"):  # unroll_mae = 2 Stage-I steps per iteration
        out[f"{mode}_s_per_stage1"] = statistics.median(times[mode]) / 2
    return out


def child_rss(mode: str, batch: int, threads: int, steps: int = 10) -> dict:
    """Peak RSS of one mode alone: after building the engine, and after ``steps`` steps."""
    runner = _setup(batch, threads)
    run = runner(mode)
    ready = _rss_mb()
    for _ in range(steps):
        run()
    return {"mode": mode, "batch": batch, "rss_ready_mb": ready, "peak_rss_mb": _rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode (>= 30)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_time.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "time":
            result = child_time(int(rest[0]), args.steps, args.threads, args.warmup)
        else:
            result = child_rss(rest[0], int(rest[1]), args.threads)
        print(json.dumps(result))
        return

    def spawn(*child_args: str) -> dict:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--warmup", str(args.warmup),
                              "--threads", str(args.threads), "--child", *child_args],
                             capture_output=True, text=True, env=env, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    timing, rss = [], []
    for batch in [int(b) for b in args.batches.split(",")]:
        print(f"batch {batch}: timing MAE, MLO and the paper's recipe interleaved ...", file=sys.stderr, flush=True)
        timing.append(spawn("time", str(batch)))
        for mode in MODES:
            print(f"batch {batch}: peak RSS of {mode} ...", file=sys.stderr, flush=True)
            rss.append(spawn("rss", mode, str(batch)))

    table = []
    for t in timing:
        batch = t["batch"]
        peak = {r["mode"]: r for r in rss if r["batch"] == batch}
        row = {"batch": batch, "mae_ms": 1000 * t["mae_s"], "mae_peak_rss_mb": peak["mae"]["peak_rss_mb"]}
        for mode in ("mlo", "paper"):
            row.update({f"{mode}_ms": 1000 * t[f"{mode}_s_per_stage1"],
                        f"{mode}_time_ratio": t[f"{mode}_s_per_stage1"] / t["mae_s"],
                        f"{mode}_peak_rss_mb": peak[mode]["peak_rss_mb"],
                        f"{mode}_rss_ratio": peak[mode]["peak_rss_mb"] / peak["mae"]["peak_rss_mb"]})
        table.append(row)
    header = (f"{'batch':>5} | {'MAE ms/step':>11} | {'MLO ms/step':>11} | {'MLO/MAE':>7} | {'paper ms/step':>13} | "
              f"{'paper/MAE':>9} | {'MAE RSS MB':>10} | {'MLO RSS MB':>10} | {'paper RSS MB':>12}")
    print(header)
    print("-" * len(header))
    for r in table:
        print(f"{r['batch']:>5} | {r['mae_ms']:>11.1f} | {r['mlo_ms']:>11.1f} | {r['mlo_time_ratio']:>6.2f}x | "
              f"{r['paper_ms']:>13.1f} | {r['paper_time_ratio']:>8.2f}x | {r['mae_peak_rss_mb']:>10.0f} | "
              f"{r['mlo_peak_rss_mb']:>10.0f} | {r['paper_peak_rss_mb']:>12.0f}")
    print("medians over interleaved steps in one process; MLO and paper ms/step = one iteration (2 Stage-I, "
          "Stage II, Stage III) / 2")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"timing": timing, "rss": rss, "table": table}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

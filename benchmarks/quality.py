"""Does the learned masking help? MLO-MAE against plain MAE, same preset, steps, data and seeds.

Each run is a real ``mlo-mae pretrain`` (Ray Train, MLflow), ending with the
linear probe (frozen encoder, L2 chosen on D_val, test split once). The table
gives mean and spread of the probe's test top-1 per mode; every run is also in
MLflow (experiment ``quality``) for the curves and heatmaps.

    python benchmarks/quality.py                      # tiny preset on the built-in digits, seeds 0 1 2
    python benchmarks/quality.py --seeds 0 1 2 3 4 -- --max-steps 300
    python benchmarks/quality.py --modes mlo -- -o optim.lr_mask=4e-5

Arguments after ``--`` go to every ``mlo-mae pretrain`` unchanged.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUN_ID = re.compile(r"^MLflow run ([0-9a-f]{32}) ", re.M)
MODES = {"mlo": ["--mlo"], "baseline": ["--baseline"]}


def pretrain(name: str, seed: int, mode: str, uri: str, extra: list[str]) -> dict:
    command = [sys.executable, str(ROOT / "cli.py"), "pretrain", "--seed", str(seed), *MODES[mode],
               "--name", name, "--storage-path", str(RESULTS / "ray_results"), "--tracking-uri", uri,
               "--experiment", "quality", *extra]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=RESULTS)  # artifacts: RESULTS/mlruns
    if result.returncode != 0:
        sys.exit(f"quality: {name} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    run_id = RUN_ID.search(result.stdout).group(1)
    import mlflow

    metrics = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
    return {"name": name, "seed": seed, "mode": mode, "run_id": run_id, "seconds": time.perf_counter() - started,
            "probe_test_top1": metrics["probe/test_top1"], "probe_val_top1": metrics["probe/val_top1"],
            "eval_val_top1": metrics.get("eval/val_top1"), "loss_mae": metrics.get("train/loss_mae")}


def summary(rows: list[dict], mode: str, key: str) -> tuple[float, float]:
    values = [r[key] for r in rows if r["mode"] == mode]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--tracking-uri", default=f"sqlite:///{RESULTS / 'mlflow.db'}")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for seed in args.seeds:
        for mode in args.modes:
            row = pretrain(f"quality-{stamp}-{mode}-s{seed}", seed, mode, args.tracking_uri, extra)
            rows.append(row)
            print(f"{mode:8s} seed {seed}: probe test top-1 {100 * row['probe_test_top1']:.1f}% "
                  f"(D_val {100 * row['probe_val_top1']:.1f}%) | {row['seconds']:.0f}s", flush=True)
    print("\n| mode | seeds | probe test top-1 (mean ± sd) | probe D_val top-1 | per seed (test) |")
    print("|---|---|---|---|---|")
    for mode in args.modes:
        test_mean, test_sd = summary(rows, mode, "probe_test_top1")
        val_mean, val_sd = summary(rows, mode, "probe_val_top1")
        per_seed = ", ".join(f"{100 * r['probe_test_top1']:.1f}" for r in rows if r["mode"] == mode)
        print(f"| {mode} | {len(args.seeds)} | {100 * test_mean:.2f} ± {100 * test_sd:.2f} | "
              f"{100 * val_mean:.2f} ± {100 * val_sd:.2f} | {per_seed} |")
    out = RESULTS / f"quality-{stamp}.json"
    out.write_text(json.dumps({"extra_args": extra, "tracking_uri": args.tracking_uri, "runs": rows}, indent=2))
    print(f"\nwrote {out}; runs in MLflow experiment 'quality' at {args.tracking_uri}")


if __name__ == "__main__":
    main()

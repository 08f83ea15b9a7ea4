"""Time to draw one evaluation's three heatmaps (mean, panel, classes), built anew vs redrawn on a run's
laid-out figures (``HeatmapRenderer``, what training uses).

A run evaluates every ``run.eval_every`` iterations on 2 cores beside training; the drawing is its
largest cost after the forward passes. Both ways in one process, interleaved evaluation by evaluation
(noise hits both alike), on random snapshots of the default 8x8 grid, 10 classes, 32-pixel images.
Usage: python benchmarks/heatmaps.py [--evaluations 10] [--sample 256] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=10)
    parser.add_argument("--sample", type=int, default=256, help="images per snapshot (run.eval_samples)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "heatmaps.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from mlo_mae.heatmaps import HeatmapRenderer, MaskSnapshot, render_classes, render_mean, render_panel

    def snapshot(step: int) -> MaskSnapshot:
        gen = torch.Generator().manual_seed(step)
        probs = torch.rand(args.sample, 64, generator=gen)
        masks = (probs >= probs.kthvalue(16, dim=1, keepdim=True).values).float()
        images = torch.randint(0, 256, (args.sample, 32, 32, 3), generator=gen, dtype=torch.uint8)
        return MaskSnapshot(step=step, grid=(8, 8), probs=probs, masks=masks,
                            labels=torch.arange(args.sample) % 10, images=images, baseline=False)

    snaps = [snapshot(step) for step in range(args.evaluations)]
    render_panel(snaps[0])  # imports and font caches, outside the timing
    renderer = HeatmapRenderer()
    fresh, reused = [], []
    for snap in snaps:
        start = time.perf_counter()
        render_mean(snap), render_panel(snap), render_classes(snap)
        fresh.append(time.perf_counter() - start)
        start = time.perf_counter()
        renderer.render(snap)
        reused.append(time.perf_counter() - start)
    table = {"built anew": fresh, "HeatmapRenderer": reused}
    print(f"{'one evaluation, 3 figures':<28}{'median s':>10}{'first s':>10}{'speed-up':>10}")
    for name, times in table.items():
        print(f"{name:<28}{statistics.median(times):>10.3f}{times[0]:>10.3f}"
              f"{statistics.median(fresh) / statistics.median(times):>10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"evaluations": args.evaluations, "sample": args.sample,
                                    "seconds": table}, indent=2))


if __name__ == "__main__":
    main()

"""CUDA check of the core (torch + timm only; no Ray, no MLflow).

1. Correctness: on the tiny model, the fd hypergradient agrees with exact mode
   (cosine), and the bf16 fd hypergradient agrees with fp32 on ``base-cifar``.
2. Speed: median time of a plain MAE step (baseline Stage I) and of one MLO
   iteration per Stage-I step, ``base-cifar`` at batch 64, fp32 and bf16.

Usage: python benchmarks/gpu_check.py [--batch 64] [--steps 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlo_mae.config import resolve  # noqa: E402
from mlo_mae.engine import MLOEngine  # noqa: E402


def _cos(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    fa = torch.cat([t.float().reshape(-1) for t in a])
    fb = torch.cat([t.float().reshape(-1) for t in b])
    return float(F.cosine_similarity(fa, fb, dim=0))


def _batches(batch: int, img: int, classes: int, seed: int, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = [(torch.randn(batch, 3, img, img, generator=gen).to(device),
             torch.randint(0, classes, (batch,), generator=gen).to(device)) for _ in range(4)]
    i = 0
    while True:
        yield pool[i % len(pool)]
        i += 1


def _streams(batch: int, img: int) -> dict:
    """One endless batch stream per level, on the GPU."""
    return {k: _batches(batch, img, 10, i, torch.device("cuda")) for i, k in enumerate(("mae", "head", "mask"))}


def _engine(preset: str, precision: str, batch: int, hypergradient: str = "fd", **model) -> MLOEngine:
    over = {"run.precision": precision, "mlo.hypergradient": hypergradient, "data.batch_mae": batch,
            "data.batch_head": batch, "data.batch_mask": batch}
    over.update({f"model.{k}": v for k, v in model.items()})
    return MLOEngine(resolve(preset=preset, overrides=over), 10, total_steps=1000, device="cuda")


def check_fd_vs_exact() -> float:
    small = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                 decoder_depth=1, decoder_num_heads=2)
    fd, ex = _engine("tiny", "fp32", 16, "fd", **small), _engine("tiny", "fp32", 16, "exact", **small)
    streams = _streams(16, 16)
    fd.step(streams)
    ex.load_state_dict(fd.state_dict())
    x1, b2, b3 = next(streams["mae"])[0], next(streams["head"]), next(streams["mask"])
    return _cos(fd.hypergradient(x1, b2, b3)[0], ex.hypergradient(x1, b2, b3)[0])


def check_bf16_vs_fp32(batch: int) -> float:
    fp32 = _engine("base-cifar", "fp32", batch)
    streams = _streams(batch, 32)
    fp32.step(streams)
    state = fp32.state_dict()
    x1, b2, b3 = next(streams["mae"])[0], next(streams["head"]), next(streams["mask"])
    g32 = fp32.hypergradient(x1, b2, b3)[0]
    del fp32
    bf16 = _engine("base-cifar", "bf16", batch)
    bf16.load_state_dict(state)
    return _cos(g32, bf16.hypergradient(x1, b2, b3)[0])


def time_steps(precision: str, batch: int, steps: int, warmup: int = 3) -> dict[str, float]:
    out = {}
    for mode in ("mae", "mlo"):
        engine = _engine("base-cifar", precision, batch)
        engine.cfg.mlo.baseline = mode == "mae"
        streams = _streams(batch, 32)
        times = []
        for _ in range(warmup + steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            if mode == "mae":
                engine.mae_step(next(streams["mae"])[0])
            else:
                engine.step(streams)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        per = statistics.median(times[warmup:]) / (1 if mode == "mae" else engine.cfg.mlo.unroll_mae)
        out[f"{mode}_ms"] = 1000 * per
        out[f"{mode}_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        del engine
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out["ratio"] = out["mlo_ms"] / out["mae_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    torch.manual_seed(0)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch}
    report["cos_fd_vs_exact_tiny_fp32"] = check_fd_vs_exact()
    report["cos_bf16_vs_fp32_base_cifar"] = check_bf16_vs_fp32(args.batch)
    print(f"{report['device']} | torch {report['torch']}")
    print(f"fd vs exact hypergradient (tiny, fp32): cosine {report['cos_fd_vs_exact_tiny_fp32']:.4f}")
    print(f"bf16 vs fp32 fd hypergradient (base-cifar): cosine {report['cos_bf16_vs_fp32_base_cifar']:.4f}")
    print(f"{'precision':>9} | {'MAE ms/step':>11} | {'MLO ms/step':>11} | {'MLO/MAE':>7} | {'MAE GB':>6} | {'MLO GB':>6}")
    for precision in ("fp32", "bf16"):
        r = time_steps(precision, args.batch, args.steps)
        report[precision] = r
        print(f"{precision:>9} | {r['mae_ms']:>11.1f} | {r['mlo_ms']:>11.1f} | {r['ratio']:>6.2f}x | "
              f"{r['mae_peak_mem_gb']:>6.1f} | {r['mlo_peak_mem_gb']:>6.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

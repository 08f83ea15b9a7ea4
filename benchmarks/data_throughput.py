"""Decode + augment throughput over the same Parquet shards: Ray Data vs a PyTorch DataLoader,
and peak memory while Ray Data streams 5 and 50 epochs (it should stay flat). Ray Data reads with the
windows training uses; all readers share this machine's cores.

    python benchmarks/data_throughput.py [--images 2000] [--size 64]

Prints a table and writes benchmarks/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def make_source(root: Path, n: int) -> None:
    """A synthetic ImageFolder of JPEGs, 96-192 px: real decode work, made locally."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(96, 193, size=2))
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        img.save(d / f"{i:06d}.jpg", quality=90)


def prepared(n: int) -> Path:
    from pipelines.prepare import prepare

    out = RESULTS / f"data-{n}"
    if not (out / "manifest.json").exists():
        src = RESULTS / f"src-{n}"
        if not src.exists():
            make_source(src, n)
        from tqdm import tqdm

        prepare(str(src), out, shard_rows=250, progress=lambda p, t: tqdm(total=t, desc=p, disable=None),
                log=print)
    return out


def _rss_of_session() -> int:
    """Resident bytes of this process and every Ray process on the machine (from /proc)."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if int(proc.name) == os.getpid() or "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd:
                rss = next(ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("VmRSS"))
                total += int(rss.split()[1]) * 1024
        except (OSError, StopIteration, ValueError):
            continue
    return total


def stream(path: Path, size: int, images: int, reader: str, workers: int = 0) -> dict:
    """Images/s of decode+augment and the peak RSS (driver + Ray processes) while streaming."""
    from pipelines.manifest import load_prepared
    from pipelines.streams import level_specs

    data = load_prepared(path)
    spec = level_specs(data, size, "rrc", seed=0)["mae"]
    batch = 64
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_of_session())
            time.sleep(0.5)

    if reader == "ray":
        from pipelines.plan import RankPlan, list_chunks
        from pipelines.ray_data import LevelStream, configure_data_context
        from training.launch import init_ray

        init_ray()
        configure_data_context()
        from training.worker import window_rows

        plan = RankPlan(list_chunks(data.files(spec.split), 1), spec.seed, 0, 1, window_rows(batch))  # as training
        it = LevelStream(plan, spec, batch, 0, images // batch + 8)
        next_batch = lambda: next(it)  # noqa: E731
    else:
        from pipelines.torch_data import loader

        def endless():
            epoch = 0
            while True:
                dl = loader(data, spec, batch, num_workers=workers)
                dl.dataset.set_epoch(epoch)
                yield from dl
                epoch += 1
        gen = endless()
        next_batch = lambda: next(gen)  # noqa: E731
    threading.Thread(target=sample, daemon=True).start()
    for _ in range(3):  # warm-up: workers started, first blocks read
        next_batch()
    start = time.perf_counter()
    seen = 0
    while seen < images:
        seen += len(next_batch()[1])
    seconds = time.perf_counter() - start
    done.set()
    return {"reader": reader if reader == "ray" else f"torch(workers={workers})", "images": seen,
            "images_per_s": seen / seconds, "peak_rss_mb": peak[0] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images in the prepared set")
    parser.add_argument("--size", type=int, default=64, help="training resolution (RandomResizedCrop)")
    parser.add_argument("--child", nargs=3, metavar=("READER", "IMAGES", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    path = prepared(args.images)
    if args.child:
        reader, images, workers = args.child
        print(json.dumps(stream(path, args.size, int(images), reader, int(workers))))
        return
    n_train = json.loads((path / "manifest.json").read_text())["counts"]["train"]["total"]
    runs = [("ray", 5 * n_train, 0), ("torch", 5 * n_train, 0), ("torch", 5 * n_train, 2), ("ray", 50 * n_train, 0)]
    rows = []
    for reader, images, workers in runs:  # each in a fresh process: clean RSS, fresh Ray
        out = subprocess.run([sys.executable, __file__, "--images", str(args.images), "--size", str(args.size),
                              "--child", reader, str(images), str(workers)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best_torch = max(r["images_per_s"] for r in rows if r["reader"].startswith("torch"))
    for r in rows:
        r["vs_best_dataloader"] = round(r["images_per_s"] / best_torch, 2)
    print(f"{'reader':<18}{'images':>8}{'img/s':>9}{'vs best DataLoader':>20}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['reader']:<18}{r['images']:>8}{r['images_per_s']:>9.0f}{r['vs_best_dataloader']:>20.2f}"
              f"{r['peak_rss_mb']:>13.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_throughput.json").write_text(json.dumps({"size": args.size, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()

"""``mlo-mae prepare`` at ImageNet-like scale: images/s with 1 and 2 jobs, peak memory, manifest size.

Builds (once, cached under ``benchmarks/results/``) a synthetic ImageFolder of
``--images`` JPEGs of 300-500 px in ``--classes`` classes, with a few bad
files planted (truncated, empty, not an image, a duplicate), and a small
second tree with ``--junk`` files that are not images: the manifest must stay
small however many inputs are skipped. Each prepare runs as the real command in
a fresh process; the resident memory of its whole process tree (the command
and its worker processes) is sampled every 0.2 s.

    python benchmarks/prepare_scale.py [--images 20000] [--jobs 1 2] [--junk 5000]

Prints a table and writes benchmarks/results/prepare_scale.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


def _write_jpeg(args: tuple[Path, int]) -> None:
    """One 300-500 px JPEG: a smooth random picture plus sensor-like noise (about 65 KB, like ImageNet's)."""
    import numpy as np
    from PIL import Image

    path, index = args
    rng = np.random.default_rng(index)
    w, h = (int(v) for v in rng.integers(300, 501, size=2))
    base = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_source(root: Path, images: int, classes: int, junk: int = 0) -> dict:
    """The tree, made in parallel; returns what was planted (the expected manifest counts)."""
    if (root / "planted.json").exists():
        return json.loads((root / "planted.json").read_text())
    shutil.rmtree(root, ignore_errors=True)
    names = [f"n{c:08d}" for c in range(classes)]
    for name in names:
        (root / name).mkdir(parents=True)
    jobs = [(root / names[i % classes] / f"{i:07d}.JPEG", i) for i in range(images)]
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        for k, _ in enumerate(pool.imap_unordered(_write_jpeg, jobs, chunksize=64), 1):
            if k % 2000 == 0 or k == images:
                print(f"  made {k}/{images} JPEGs ({time.perf_counter() - started:.0f} s)", flush=True)
    first = jobs[0][0].read_bytes()
    bad = {"truncated": 0, "empty": 0, "not an image": 0, "duplicate": 0}
    for k in range(5):  # a few of each defect, in different classes
        folder = root / names[(7 * k) % classes]
        (folder / f"truncated_{k}.JPEG").write_bytes(first[: len(first) // 3])
        (folder / f"empty_{k}.JPEG").write_bytes(b"")
        (folder / f"notes_{k}.txt").write_text("not an image\n")
        (folder / f"copy_{k}.JPEG").write_bytes(jobs[k + 1][0].read_bytes())
        for key in bad:
            bad[key] += 1
    for k in range(junk):  # e.g. a tree whose class folders also hold metadata files
        (root / names[k % classes] / f"meta_{k:06d}.xml").write_text(f"<annotation>{k}</annotation>\n")
    planted = {"images": images, "classes": classes, "skipped": sum(bad.values()) + junk, "bad": bad, "junk": junk,
               "bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file())}
    (root / "planted.json").write_text(json.dumps(planted))
    return planted


def _tree_memory(pid: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes of ``pid`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            rss += int((Path(f"/proc/{p}/statm").read_text().split()[1])) * PAGE
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    return rss, pss


def run_prepare(source: Path, jobs: int) -> dict:
    """One ``mlo-mae prepare`` of ``source`` in a fresh process: wall time, peak memory, manifest size."""
    out = Path(tempfile.mkdtemp(prefix="prepare-scale-", dir=RESULTS)) / "prepared"
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's code, whatever is installed
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "prepare", str(source), str(out),
                             "--jobs", str(jobs)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = [0, 0]

    def sample() -> None:
        while proc.poll() is None:
            rss, pss = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        log = proc.communicate()[0]
        seconds = time.perf_counter() - started
        sampler.join()
        if proc.returncode != 0:
            raise SystemExit(f"prepare failed (exit {proc.returncode}):\n{log[-3000:]}")
        manifest = json.loads((out / "manifest.json").read_text())
        side = [p for p in out.iterdir() if p.is_file() and p.name != "manifest.json"]
        result = {"jobs": jobs, "inputs": manifest["inputs"],
                  "stored": sum(c["total"] for c in manifest["counts"].values()),
                  "skipped": manifest["skipped"]["total"], "seconds": round(seconds, 1),
                  "inputs_per_s": round(manifest["inputs"] / seconds, 1), "peak_rss_mb": round(peak[0] / 2**20),
                  "peak_pss_mb": round(peak[1] / 2**20),
                  "manifest_kb": round((out / "manifest.json").stat().st_size / 1024, 1),
                  "side_files_kb": {p.name: round(p.stat().st_size / 1024, 1) for p in side},
                  "shards": len(manifest["shards"]),
                  "output_mb": round(sum(s["bytes"] for s in manifest["shards"]) / 2**20)}
    finally:
        proc.kill()
        shutil.rmtree(out.parent, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000, help="JPEGs in the large tree")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="--jobs values to time")
    parser.add_argument("--junk", type=int, default=5000, help="non-image files in the many-skipped tree")
    parser.add_argument("--out", type=Path, default=RESULTS / "prepare_scale.json")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    print(f"source trees (made once, under {RESULTS}):", flush=True)
    large_root = RESULTS / f"prepare-src-{args.images}x{args.classes}"
    large = make_source(large_root, args.images, args.classes)
    junk_root = RESULTS / f"prepare-src-junk-{args.junk}"
    junk = make_source(junk_root, 1000, 10, args.junk)
    rows = []
    for name, root, planted, jobs in ([("large", large_root, large, j) for j in args.jobs]
                                      + [("many skipped", junk_root, junk, max(args.jobs))]):
        print(f"prepare {name} tree ({planted['images'] + planted['skipped']} files), --jobs {jobs} ...", flush=True)
        row = {"tree": name, **run_prepare(root, jobs)}
        print(f"  {row}", flush=True)
        expected = planted["images"]  # the planted copies are the skipped duplicates
        if row["stored"] != expected or row["skipped"] != planted["skipped"]:
            raise SystemExit(f"{name}: stored {row['stored']} (expected {expected}), skipped {row['skipped']} "
                             f"(expected {planted['skipped']})")
        rows.append(row)
    header = f"{'tree':<14}{'files':>7}{'jobs':>6}{'seconds':>9}{'files/s':>9}{'peak RSS MB':>13}" \
             f"{'peak PSS MB':>13}{'manifest KB':>13}{'side KB':>9}"
    print(header)
    for r in rows:
        print(f"{r['tree']:<14}{r['inputs']:>7}{r['jobs']:>6}{r['seconds']:>9.1f}{r['inputs_per_s']:>9.1f}"
              f"{r['peak_rss_mb']:>13}{r['peak_pss_mb']:>13}{r['manifest_kb']:>13.1f}"
              f"{sum(r['side_files_kb'].values()):>9.1f}")
    summary = {"source": {"images": large["images"], "classes": large["classes"], "mb": round(large["bytes"] / 2**20),
                          "bad": large["bad"]}, "junk_tree": junk, "cpus": os.cpu_count(), "runs": rows}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

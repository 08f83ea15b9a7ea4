"""``mlo-mae prepare``: any labelled image source becomes Parquet shards with the method's fixed splits.

Two passes, so that no image collection is held in memory. Pass 1 decodes every
input once (in parallel for file trees) to classify it, find duplicates and
gather statistics; the split is then decided. Pass 2 writes each split's shards
(one task per shard), rows in a seeded shuffled order so that streaming a few
shards already mixes classes. Everything is written to a hidden sibling folder
that is renamed into place only when complete. An OUT in object storage
(``s3://bucket/prefix``) is prepared in a local temporary folder the same way,
each shard uploaded as soon as it is written and then deleted (local disk holds
only the shards in flight), ``manifest.json`` last: a prefix without a
manifest is never mistaken for a data set. From an image tree, no pixels are
held beyond one row group per job; what grows with the data set is pass 1's
metadata, about 0.9 KB a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from mlo_mae.errors import InputError

from .images import Inspection, inspect_bytes
from .location import absolute, check_reachable, filesystem, is_uri, join, short_reason
from .manifest import FORMAT, MANIFEST, load_prepared, sha256_file
from .sources import Item, SourceError, inspect_file, open_source
from .splits import SPLITS, TEST_FRACTION, VAL_FRACTION, assign_splits, rank_key

DEFAULT_SHARD_MB = 128
ROW_GROUP_ROWS = 128  # a chunk of the streaming plan (pipelines.plan)
SKIPPED = "skipped.jsonl"  # every skipped input, one JSON object per line
SKIPPED_SHOWN = 20  # skipped inputs listed in the manifest itself: it stays small with thousands skipped

SCHEMA = pa.schema([
    ("image", pa.binary()),  # encoded bytes: the original file, or lossless PNG when converted
    ("label", pa.int64()),
    ("id", pa.int64()),  # row number within the split: stable identity for seeding augmentation
    ("ref", pa.string()),  # where the row came from (relative path, or archive index)
    ("width", pa.int32()),
    ("height", pa.int32()),
])


class PrepareError(InputError):
    """Preparation refused or stopped; the message is one line for the user."""


Progress = Callable[[str, int], Any]  # (phase, total) -> context manager with .update(n)


@dataclasses.dataclass(slots=True)
class _Row:
    item: Item
    ins: Inspection
    split: str = ""


def _meta_only(path: Path) -> Inspection:
    return dataclasses.replace(inspect_file(path), payload=None)


def _category(reason: str) -> str:
    return reason.split(" (", 1)[0]


def _fingerprint(source_desc: dict, seed: int) -> dict:
    return {"format": FORMAT, "source": source_desc, "seed": seed,
            "split_rule": {"test": "official" if source_desc.get("has_official_test") else TEST_FRACTION,
                           "val": VAL_FRACTION}}


def _same_data_set(previous: dict, fingerprint: dict, out: str) -> bool:
    """True when the manifest ``previous`` is of this very data set; raises if it is of another one."""
    if {k: previous.get(k) for k in fingerprint} == fingerprint:
        return True
    raise PrepareError(f"OUT '{out}' already holds a different data set (source "
                       f"{previous.get('source', {}).get('path')!r}, seed {previous.get('seed')}); "
                       "choose another folder")


def _check_remote_output(out: str, fingerprint: dict) -> bool:
    """``_check_output`` for a URI: its manifest, else no object under the prefix."""
    check_reachable(out, "OUT")
    fs, root = filesystem(out)
    try:
        found = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True, recursive=True))
        if not any(f.path == join(root, MANIFEST) for f in found):
            if found:
                raise PrepareError(f"OUT '{out}' is not empty and holds no {MANIFEST}; choose an empty or new prefix")
            return False
        with fs.open_input_stream(join(root, MANIFEST)) as handle:
            previous = json.loads(handle.read())
    except PrepareError:
        raise
    except (OSError, ValueError) as err:
        raise PrepareError(f"OUT '{out}' cannot be read ({short_reason(err)})") from None
    return _same_data_set(previous, fingerprint, out)


class _Uploader:
    """Files of the staging folder to the prefix ``out`` as they are finished, each deleted locally once
    stored: local disk holds only the shards in flight. ``prepare`` discards the upload on any failure."""

    def __init__(self, out: str, staging: Path) -> None:
        self.out, self.staging = out, staging
        self.fs, self.root = filesystem(out)

    def __call__(self, path: Path) -> None:
        target = join(self.root, path.relative_to(self.staging).as_posix())
        try:
            with open(path, "rb") as source, self.fs.open_output_stream(target) as sink:
                shutil.copyfileobj(source, sink, 8 * 2**20)
        except OSError as err:
            raise PrepareError(f"OUT '{self.out}': uploading {path.name} failed ({short_reason(err)}); run prepare "
                               "again") from None
        path.unlink()

    def discard(self) -> None:
        """Remove everything uploaded: no half data set left to block the next attempt."""
        with contextlib.suppress(OSError):
            self.fs.delete_dir_contents(self.root, missing_dir_ok=True)


def _check_output(out: Path, fingerprint: dict) -> bool:
    """True when ``out`` already holds this very data set; raises if it holds anything else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise PrepareError(f"OUT '{out}' exists and is not a folder")
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = {}
        return _same_data_set(previous, fingerprint, str(out))
    if any(out.iterdir()):
        raise PrepareError(f"OUT '{out}' is not empty and holds no {MANIFEST}; choose an empty or new folder")
    return False


def _inspect_all(source, items: list[Item], jobs: int, progress: Progress) -> list[Inspection]:
    with progress("inspecting", len(items)) as bar:
        if source.on_disk and jobs > 1 and len(items) > 256:
            paths = [source.file_of(it) for it in items]
            ctx = multiprocessing.get_context("spawn")
            out = []
            with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
                for ins in pool.map(_meta_only, paths, chunksize=64):
                    out.append(ins)
                    bar.update(1)
            return out
        out = []
        for it in items:
            out.append(dataclasses.replace(source.read(it), payload=None))
            bar.update(1)
        return out


def _stored_bytes(file: str, digest: str, converted: bool) -> bytes:
    """What pass 2 stores for a file inspected in pass 1: its bytes, checked against the pass-1 digest, or
    (when pass 1 converted it) the conversion. Only converted files are decoded again."""
    try:
        data = Path(file).read_bytes()
    except OSError:
        data = None
    if data is not None and hashlib.sha256(data).hexdigest() == digest:
        payload = inspect_bytes(data).payload if converted else data
        if payload is not None:  # (None: cannot happen for the same bytes; never store an unconverted original)
            return payload
    raise PrepareError(f"'{file}' changed while it was being prepared; run prepare again")


def _write_shard(path: str, refs: Sequence[str], files: Sequence[str | None], payloads: Sequence[bytes | None],
                 labels: Sequence[int], ids: Sequence[int], digests: Sequence[str], converted: Sequence[bool],
                 sizes: Sequence[tuple[int, int]]) -> dict:
    """One shard, written a row group at a time (memory: one row group of images). Rows are given as a file
    (re-read and checked against pass 1) or as ready bytes. Returns its rows, bytes and checksum."""
    with pq.ParquetWriter(path, SCHEMA, compression="none") as writer:
        for lo in range(0, len(refs), ROW_GROUP_ROWS):
            rows = range(lo, min(lo + ROW_GROUP_ROWS, len(refs)))
            images = [payloads[i] if payloads[i] is not None else _stored_bytes(files[i], digests[i], converted[i])
                      for i in rows]
            writer.write_table(pa.table({
                "image": pa.array(images, pa.binary()), "label": pa.array([labels[i] for i in rows], pa.int64()),
                "id": pa.array([ids[i] for i in rows], pa.int64()), "ref": pa.array([refs[i] for i in rows]),
                "width": pa.array([sizes[i][0] for i in rows], pa.int32()),
                "height": pa.array([sizes[i][1] for i in rows], pa.int32()),
            }, schema=SCHEMA), row_group_size=ROW_GROUP_ROWS)
    return {"rows": len(refs), "bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def _plan_shards(rows: list[_Row], shard_bytes: int, shard_rows: int | None) -> list[list[_Row]]:
    shards: list[list[_Row]] = [[]]
    size = 0
    for row in rows:
        nbytes = row.ins.nbytes
        full = (shard_rows and len(shards[-1]) >= shard_rows) or (not shard_rows and size + nbytes > shard_bytes)
        if shards[-1] and full:
            shards.append([])
            size = 0
        shards[-1].append(row)
        size += nbytes
    return [s for s in shards if s]


def _stats(values: Iterable[int]) -> dict[str, float]:
    arr = np.fromiter(values, dtype=np.float64)
    if not arr.size:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": int(arr.min()), "max": int(arr.max()), "mean": round(float(arr.mean()), 2)}


def prepare(source_arg: str, out: Path, *, test_source: Path | None = None, seed: int = 0,
            cifar_labels: str = "fine", shard_mb: float = DEFAULT_SHARD_MB, shard_rows: int | None = None,
            jobs: int | None = None, on_bad_image: str = "skip", progress: Progress,
            log: Callable[[str], None] = print) -> dict:
    """Prepare ``source_arg`` into ``out``; returns the manifest. Idempotent for the same source and seed."""
    jobs = jobs or os.cpu_count() or 1
    start = time.perf_counter()
    try:
        source = open_source(source_arg, test_source, cifar_labels)
    except SourceError as err:
        raise PrepareError(str(err)) from None
    items = list(source.items())
    desc = dict(source.describe(), has_official_test=any(it.official_test for it in items))
    fingerprint = _fingerprint(desc, seed)
    remote = absolute(out) if is_uri(str(out)) else None
    out = Path(str(out).rstrip("/").rsplit("/", 1)[-1]) if remote else Path(out)  # remote: its name only
    if _check_remote_output(remote, fingerprint) if remote else _check_output(out, fingerprint):
        log(f"'{remote or out}' already holds this data set (same source and seed); nothing to do")
        return load_prepared(remote or out).manifest
    if not items:
        raise PrepareError(f"SOURCE '{source_arg}' holds no files in its class folders")

    skipped: list[dict[str, str]] = [{"ref": ref, "reason": "hidden file"} for ref in getattr(source, "hidden", [])]
    skipped += [{"ref": ref, "reason": "class folder not in the training source"}
                for ref in getattr(source, "unknown_class", [])]
    inspections = _inspect_all(source, items, jobs, progress)
    rows: list[_Row] = []
    first_of: dict[str, str] = {}
    for item, ins in zip(items, inspections):
        if ins.status == "skipped":
            if on_bad_image == "fail":
                raise PrepareError(f"{_where(source, item)}: {ins.reason} (--on-bad-image fail)")
            skipped.append({"ref": item.ref, "reason": ins.reason})
        elif ins.digest in first_of:
            skipped.append({"ref": item.ref, "reason": f"duplicate (same bytes as {first_of[ins.digest]})"})
        else:
            first_of[ins.digest] = item.ref
            rows.append(_Row(item, ins))
    if not rows:
        raise PrepareError(f"SOURCE '{source_arg}': none of its {len(items)} files is a readable image")

    labels = np.array([r.item.label for r in rows])
    splits = assign_splits([r.ins.digest for r in rows], labels, np.array([r.item.official_test for r in rows]),
                           seed)
    for row, split in zip(rows, splits):
        row.split = str(split)

    staging = Path(tempfile.mkdtemp(prefix="mlo-mae-prepare-")) if remote else out.parent
    tmp = staging / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    finished = _Uploader(remote, tmp) if remote else None  # a local folder keeps its files
    try:
        shard_table = _write_splits(source, rows, tmp, seed, int(shard_mb * 2**20), shard_rows, jobs, progress,
                                    finished)
        manifest = _manifest(source, desc, fingerprint, rows, skipped, shard_table, tmp, seed,
                             shard_mb, shard_rows, time.perf_counter() - start)
        with (tmp / SKIPPED).open("w", encoding="utf-8") as side:  # every skipped input; the manifest has a few
            side.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in skipped)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        if finished:
            finished(tmp / SKIPPED)
            finished(tmp / MANIFEST)  # last: a prefix without a manifest is never a data set
        else:
            if out.exists():
                out.rmdir()  # known empty (checked above)
            os.replace(tmp, out)
    except BaseException:
        if finished:  # shards already uploaded (a changed file, a full disk, Ctrl-C): none left behind
            finished.discard()
        raise
    finally:
        shutil.rmtree(tmp if not remote else staging, ignore_errors=True)
    return manifest


def _where(source, item: Item) -> str:
    return f"'{source.file_of(item)}'" if source.on_disk else f"'{item.ref}'"


def _shard_args(source, shard: list[_Row], path: Path, first_id: int) -> tuple:
    """Arguments of ``_write_shard``: file paths for trees (re-read in the task), bytes for in-memory sources."""
    return (str(path), [r.item.ref for r in shard],
            [str(source.file_of(r.item)) if source.on_disk else None for r in shard],
            [None if source.on_disk else source.read(r.item).payload for r in shard],
            [r.item.label for r in shard], list(range(first_id, first_id + len(shard))),
            [r.ins.digest for r in shard], [r.ins.status == "converted" for r in shard],
            [(r.ins.width, r.ins.height) for r in shard])


def _write_splits(source, rows: list[_Row], tmp: Path, seed: int, shard_bytes: int, shard_rows: int | None,
                  jobs: int, progress: Progress, finished: Callable[[Path], None] | None) -> list[dict]:
    """Every split's shards, in parallel for file trees; ``finished`` (if given) takes each written shard.
    At most two shards per job are written and not yet taken, whatever the data set's size."""
    plan = []  # (split, file, rows, first id)
    for split in SPLITS:
        members = sorted((r for r in rows if r.split == split), key=lambda r: rank_key(seed + 1, r.ins.digest))
        (tmp / split).mkdir(parents=True)
        first_id = 0
        for k, shard in enumerate(_plan_shards(members, shard_bytes, shard_rows)):
            plan.append((split, f"{split}/part-{k:05d}.parquet", shard, first_id))
            first_id += len(shard)
    written: dict[str, dict] = {}

    def take(file: str, result: dict) -> None:
        written[file] = result
        if finished:
            finished(tmp / file)
        bar.update(result["rows"])

    with progress("writing shards" if finished is None else "writing and uploading shards", len(rows)) as bar:
        if jobs > 1 and len(plan) > 1 and source.on_disk:
            with ProcessPoolExecutor(min(jobs, len(plan)), mp_context=multiprocessing.get_context("spawn")) as pool:
                pending: dict = {}
                try:
                    for _, file, shard, first in plan:
                        if len(pending) >= 2 * jobs:
                            done, _ = wait(pending, return_when=FIRST_COMPLETED)
                            for fut in done:
                                take(pending.pop(fut), fut.result())
                        pending[pool.submit(_write_shard, *_shard_args(source, shard, tmp / file, first))] = file
                    for fut in as_completed(list(pending)):
                        take(pending.pop(fut), fut.result())
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # report now, not after the queued shards
                    raise
        else:  # one shard's bytes in memory at a time
            for _, file, shard, first in plan:
                take(file, _write_shard(*_shard_args(source, shard, tmp / file, first)))
    return [{"split": split, "file": file, **written[file]} for split, file, _, _ in plan]


def _manifest(source, desc: dict, fingerprint: dict, rows: list[_Row], skipped: list[dict], shards: list[dict],
              tmp: Path, seed: int, shard_mb: float, shard_rows: int | None, seconds: float) -> dict:
    names = list(source.class_names)
    counts = {}
    for split in SPLITS:
        per_class = Counter(r.item.label for r in rows if r.split == split)
        counts[split] = {"total": sum(per_class.values()),
                         "per_class": {names[i]: per_class.get(i, 0) for i in range(len(names))}}
    train = [r.ins for r in rows if r.split == "train"]
    mean = np.mean([i.channel_mean for i in train], axis=0)
    sq = np.mean([i.channel_sq_mean for i in train], axis=0)
    std = np.sqrt(np.maximum(sq - mean**2, 1e-12))
    by_reason = Counter(_category(s["reason"]) for s in skipped)
    conversions = Counter(r.ins.reason for r in rows if r.ins.status == "converted")
    return {
        **fingerprint,
        "name": tmp.name.split(".tmp-")[0].lstrip("."),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
        "classes": names,
        "empty_classes": source.empty_classes(),
        "counts": counts,
        "inputs": len(rows) + len(skipped),
        "image_stats": {
            "width": _stats(r.ins.width for r in rows), "height": _stats(r.ins.height for r in rows),
            "kept_bytes": sum(r.ins.status == "kept" for r in rows),
            "converted": sum(r.ins.status == "converted" for r in rows),
            "conversions": dict(conversions.most_common()),
            "formats": dict(Counter(r.ins.format for r in rows).most_common()),
            "train_channel_mean": [round(float(x), 6) for x in mean],
            "train_channel_std": [round(float(x), 6) for x in std],
        },
        "skipped": {"total": len(skipped), "by_reason": dict(by_reason.most_common()),
                    "first": skipped[:SKIPPED_SHOWN], "all_in": SKIPPED},
        "shard_options": {"shard_mb": shard_mb, "shard_rows": shard_rows},
        "shards": shards,
        "columns": SCHEMA.names,
    }


__all__ = ["DEFAULT_SHARD_MB", "PrepareError", "prepare"]

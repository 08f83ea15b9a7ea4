"""Small image collections made on the fly: ImageFolder trees with every kind of bad input, and
CIFAR archives in the real python-pickle format."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def random_rgb(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def make_image_folder(root: Path, per_class: int = 30, classes=("ant", "bee", "cat"), seed: int = 0) -> dict:
    """Good images plus every bad input the prepare step must handle; returns what was planted."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    good = 0
    for c, name in enumerate(classes):
        (root / name).mkdir()
        for i in range(per_class):
            w, h = int(rng.integers(12, 40)), int(rng.integers(12, 40))
            fmt, ext = (("JPEG", "jpg"), ("PNG", "png"))[i % 2]
            (root / name / f"{i:03d}.{ext}").write_bytes(encode(random_rgb(rng, w, h), fmt))
            good += 1
    a, b = root / classes[0], root / classes[1]
    valid_jpeg = encode(random_rgb(rng, 64, 64), "JPEG")
    grey = Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L")
    ramp16 = Image.fromarray(np.tile(np.linspace(0, 65535, 20).astype(np.uint16), (20, 1)))  # mode I;16
    palette = random_rgb(rng, 20, 20).convert("P")
    planted = {
        "empty file": [a / "empty.jpg"],
        "corrupt or truncated": [a / "truncated.jpg"],
        "not an image": [b / "garbage.png", b / "notes.txt"],
        "hidden file": [root / classes[2] / ".DS_Store", a / "._shadow.jpg"],
        "duplicate": [b / "copy_of_ant_000.jpg"],
    }
    (a / "empty.jpg").write_bytes(b"")
    (a / "truncated.jpg").write_bytes(valid_jpeg[: len(valid_jpeg) // 2])
    (b / "garbage.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (b / "notes.txt").write_text("labels were checked by hand\n")
    (root / classes[2] / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (a / "._shadow.jpg").write_bytes(b"\x00\x05\x16\x07")
    (b / "copy_of_ant_000.jpg").write_bytes((a / "000.jpg").read_bytes())
    converted = {
        "mode L": a / "grey.png", "mode RGBA": a / "rgba.png", "mode CMYK": b / "cmyk.jpg",
        "mode I;16": b / "depth16.png", "mode P": root / classes[2] / "palette.png",
    }
    (a / "grey.png").write_bytes(encode(grey, "PNG"))
    rgba = random_rgb(rng, 20, 20).convert("RGBA")
    rgba.putalpha(128)
    (a / "rgba.png").write_bytes(encode(rgba, "PNG"))
    (b / "cmyk.jpg").write_bytes(encode(random_rgb(rng, 20, 20).convert("CMYK"), "JPEG"))
    (b / "depth16.png").write_bytes(encode(ramp16, "PNG"))
    (root / classes[2] / "palette.png").write_bytes(encode(palette, "PNG", transparency=0))
    (a / "tiny.png").write_bytes(encode(random_rgb(rng, 1, 1), "PNG"))
    (a / "huge.jpg").write_bytes(encode(Image.new("RGB", (2400, 1800), (10, 200, 30)), "JPEG"))
    non_utf8 = os.path.join(os.fsencode(b), b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    with open(non_utf8, "wb") as f:
        f.write(encode(random_rgb(rng, 16, 16), "PNG"))
    (root / "empty_class").mkdir()
    kept = good + len(converted) + 3  # tiny, huge, non-UTF-8 name
    skipped = sum(len(v) for v in planted.values())
    return {"kept": kept, "skipped": skipped, "planted": planted, "converted": converted,
            "files": kept + skipped, "classes": [*sorted(classes), "empty_class"]}


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def make_cifar(path: Path, variant: str = "cifar10", per_batch: int = 40, test_rows: int = 60,
               seed: int = 0) -> dict:
    """A CIFAR archive (``.tar.gz``) or folder in the distributed layout; returns the arrays written."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    arrays = {}
    if variant == "cifar10":
        folder, names = "cifar-10-batches-py", [f"c{i}" for i in range(10)]
        for split, batches in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
            rows = per_batch if split == "train" else test_rows
            data_all, labels_all = [], []
            for batch in batches:
                data = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
                labels = (np.arange(rows) % 10).tolist()
                files[f"{folder}/{batch}"] = _pickle({b"batch_label": batch.encode(), b"labels": labels,
                                                      b"data": data,
                                                      b"filenames": [b"x%d.png" % i for i in range(rows)]})
                data_all.append(data)
                labels_all += labels
            arrays[split] = (np.concatenate(data_all), np.array(labels_all))
        files[f"{folder}/batches.meta"] = _pickle({b"label_names": [n.encode() for n in names],
                                                   b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    else:
        folder = "cifar-100-python"
        fine_names, coarse_names = [f"f{i}" for i in range(100)], [f"k{i}" for i in range(20)]
        for split, rows in (("train", per_batch * 5), ("test", test_rows)):
            data = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
            fine = (np.arange(rows) % 100).tolist()
            files[f"{folder}/{split}"] = _pickle({b"filenames": [], b"batch_label": split.encode(),
                                                  b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
                                                  b"data": data})
            arrays[split] = (data, np.array(fine))
        files[f"{folder}/meta"] = _pickle({b"fine_label_names": [n.encode() for n in fine_names],
                                           b"coarse_label_names": [n.encode() for n in coarse_names]})
    if path.suffix == ".gz":
        with tarfile.open(path, "w:gz") as tar:
            for name, blob in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        for name, blob in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(blob)
    return arrays


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: big-endian magic, one big-endian count per dimension, then the unsigned bytes."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def make_idx(root: Path, train: int = 40, test: int = 20, classes: int = 4, size: int = 12, gz: bool = True,
             seed: int = 0) -> dict:
    """An MNIST-format folder (train-*-ubyte and t10k-*-ubyte, gzipped or plain); returns the arrays written."""
    import gzip

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, rows in (("train", "train", train), ("test", "t10k", test)):
        images = rng.integers(0, 256, (rows, size, size), dtype=np.uint8)
        labels = (np.arange(rows) % classes).astype(np.uint8)
        for kind, array, magic, dims in (("images", images, 0x803, 3), ("labels", labels, 0x801, 1)):
            blob = idx_bytes(array, magic)
            name = f"{prefix}-{kind}-idx{dims}-ubyte"
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (root / name).write_bytes(blob)
        arrays[split] = (images, labels.astype(np.int64))
    return arrays

"""Where labelled images come from: an ImageFolder tree, a CIFAR python archive, MNIST-format IDX
files (MNIST, Fashion-MNIST, KMNIST), or the built-in digits.

A source lists its items (a reference, a label, which split the source itself
assigns) and reads one item at a time, so that nothing holds a whole image
collection in memory. File references are paths relative to the tree's root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import zlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlo_mae.errors import InputError

from .images import Inspection, inspect_bytes, inspect_pixels


class SourceError(InputError):
    """A source that cannot be read at all; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Item:
    ref: str  # readable identity: a relative path (non-UTF-8 bytes escaped) or "train/123"
    label: int
    official_test: bool = False  # the source's own held-out split


def display_path(path: Path | str) -> str:
    """A path as valid UTF-8 text for manifests and Parquet, whatever bytes the file system holds."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


class ImageFolderSource:
    """ImageNet's train layout: ``root/<class>/<image>``; class index = position in sorted class names.

    ``test_root`` (optional) has the same layout and supplies the official test split.
    Hidden files and folders (".DS_Store", "._x.jpg") are counted as skipped, not read.
    """

    kind = "imagefolder"
    on_disk = True  # items are files: re-read (in parallel) when shards are written

    def __init__(self, root: Path, test_root: Path | None = None) -> None:
        self.root, self.test_root = Path(root), Path(test_root) if test_root else None
        for where, flag in ((self.root, "SOURCE"), (self.test_root, "--test-source")):
            if where is not None and not where.is_dir():
                raise SourceError(f"{flag} '{where}' is not a folder")
        self.class_names = self._classes(self.root)
        if not self.class_names:
            raise SourceError(f"'{self.root}' holds no class folders (expected ROOT/<class>/<image files>)")
        self._index = {name: i for i, name in enumerate(self.class_names)}
        self._paths: dict[str, str] = {}
        self.hidden: list[str] = []  # refs of hidden files, reported as skipped
        self.unknown_class: list[str] = []  # test-tree files whose class the train tree lacks

    @staticmethod
    def _classes(root: Path) -> list[str]:
        return sorted(display_path(p.name) for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _walk(self, root: Path, prefix: str, official_test: bool) -> Iterator[Item]:
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            name = display_path(class_dir.name)
            files = sorted(f for f in class_dir.rglob("*") if f.is_file() or f.is_symlink())
            for f in files:
                ref = prefix + display_path(f.relative_to(root))
                if any(part.startswith(".") for part in f.relative_to(class_dir).parts):
                    self.hidden.append(ref)
                    continue
                if name not in self._index:
                    self.unknown_class.append(ref)
                    continue
                self._paths[ref] = os.fspath(f)  # a str: a Path object costs ~3x the memory, per file
                yield Item(ref, self._index[name], official_test)

    def items(self) -> Iterator[Item]:
        if self.test_root is not None:  # first, so that train copies of test images count as duplicates
            yield from self._walk(self.test_root, "test:", True)
        yield from self._walk(self.root, "", False)

    def empty_classes(self) -> list[str]:
        counts = {name: 0 for name in self.class_names}
        for ref in self._paths:
            if not ref.startswith("test:"):
                counts[ref.split("/", 1)[0]] += 1
        return [name for name, n in counts.items() if n == 0]

    def file_of(self, item: Item) -> Path:
        return Path(self._paths[item.ref])

    def read(self, item: Item) -> Inspection:
        return inspect_file(self.file_of(item))

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.root.resolve()),
                "test_path": str(self.test_root.resolve()) if self.test_root else None}


def inspect_file(path: Path) -> Inspection:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return Inspection("skipped", f"unreadable ({err.strerror or err})")
    return inspect_bytes(data)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow the numpy array constructors and nothing else (no code)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # bytes, in protocol-2 pickles

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


class CifarSource:
    """``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` or their extracted folders, read locally.

    The official test batch is the test split. CIFAR-100 takes ``label_kind`` fine (100) or coarse (20).
    """

    kind = "cifar"
    on_disk = False
    LAYOUTS = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                    "batches.meta"),
        "cifar100": ("cifar-100-python", ["train"], ["test"], "meta"),
    }

    def __init__(self, path: Path, label_kind: str = "fine") -> None:
        self.path = Path(path)
        self.label_kind = label_kind
        raw = self._read_all()
        self.variant = next((v for v, (folder, *_rest) in self.LAYOUTS.items()
                             if any(m.startswith(folder + "/") for m in raw)), None)
        if self.variant is None:
            raise SourceError(f"'{self.path}' is not a CIFAR-10/100 python archive "
                              "(expected cifar-10-batches-py/ or cifar-100-python/ inside)")
        folder, train, test, meta = self.LAYOUTS[self.variant]
        meta_dict = self._unpickle(raw, f"{folder}/{meta}")
        names_key = b"label_names" if self.variant == "cifar10" else f"{label_kind}_label_names".encode()
        labels_key = b"labels" if self.variant == "cifar10" else f"{label_kind}_labels".encode()
        try:
            self.class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta_dict[names_key]]
        except KeyError:
            raise SourceError(f"'{self.path}': {folder}/{meta} lacks {names_key.decode()}") from None
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split, names in (("train", train), ("test", test)):
            batches = [self._unpickle(raw, f"{folder}/{n}") for n in names]
            try:
                data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
                labels = np.concatenate([np.asarray(b[labels_key], dtype=np.int64) for b in batches])
            except KeyError as err:
                raise SourceError(f"'{self.path}': a {split} batch lacks key {err.args[0]!r}") from None
            if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
                raise SourceError(f"'{self.path}': {split} data has shape {data.shape}, expected (N, 3072) "
                                  f"with one label per row")
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
                raise SourceError(f"'{self.path}': {split} labels outside 0..{len(self.class_names) - 1}")
            self._arrays[split] = (data, labels)

    def _read_all(self) -> dict[str, bytes]:
        """Every small member at once: one pass through a .tar.gz instead of one per batch."""
        if self.path.is_dir():
            return {display_path(p.relative_to(self.path)): p.read_bytes()
                    for p in self.path.rglob("*") if p.is_file()}
        try:
            with tarfile.open(self.path) as tar:
                out = {}
                for member in tar:
                    f = tar.extractfile(member) if member.isfile() else None
                    if f is not None:
                        out[member.name.removeprefix("./")] = f.read()
                return out
        except (tarfile.TarError, OSError, EOFError) as err:
            raise SourceError(f"'{self.path}' is neither a folder nor a readable tar archive "
                              f"({' '.join(str(err).split())})") from None

    def _unpickle(self, raw: dict[str, bytes], member: str) -> dict:
        if member not in raw:
            raise SourceError(f"'{self.path}' lacks {member}")
        try:
            return _NumpyOnlyUnpickler(io.BytesIO(raw[member]), encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise SourceError(f"'{self.path}': cannot read {member} ({err})") from None

    def items(self) -> Iterator[Item]:
        for split in ("test", "train"):
            labels = self._arrays[split][1]
            for i, label in enumerate(labels.tolist()):
                yield Item(f"{split}/{i}", int(label), split == "test")

    def read(self, item: Item) -> Inspection:
        split, i = item.ref.split("/")
        row = self._arrays[split][0][int(i)]
        return inspect_pixels(np.ascontiguousarray(row.reshape(3, 32, 32).transpose(1, 2, 0)))

    def empty_classes(self) -> list[str]:
        present = set(self._arrays["train"][1].tolist())
        return [n for i, n in enumerate(self.class_names) if i not in present]

    def describe(self) -> dict:
        return {"kind": self.kind, "variant": self.variant, "path": str(self.path.resolve()),
                "labels": self.label_kind if self.variant == "cifar100" else "fine"}


# Label files of the known IDX data sets, as distributed (md5 of the .gz) or decompressed (sha256):
# how a folder of IDX files is given its class names.
IDX_SETS = {
    "fashion-mnist": (["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle boot"],
                      {"25c81989df183df01b3e8a0aad5dffbe",  # md5, zalandoresearch's train-labels-idx1-ubyte.gz
                       "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"}),  # sha256, decompressed
    "kmnist": (["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
               {"e144d726b3acfaa3e44228e80efcd344"}),
    "mnist": ([str(d) for d in range(10)], {"d53e105ee54ea40749a09fcbcd1e9432"}),
}
IDX_FILES = {("train", "images"): "train-images-idx3-ubyte", ("train", "labels"): "train-labels-idx1-ubyte",
             ("test", "images"): "t10k-images-idx3-ubyte", ("test", "labels"): "t10k-labels-idx1-ubyte"}
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned bytes, 3 or 1 dimensions


def is_idx_folder(path: Path) -> bool:
    return any((path / (name + ext)).is_file() for name in IDX_FILES.values() for ext in ("", ".gz"))


class IdxSource:
    """MNIST-format IDX files in one folder, as MNIST, Fashion-MNIST and KMNIST are distributed:
    ``train-{images-idx3,labels-idx1}-ubyte[.gz]`` and ``t10k-*`` (the official test split).

    Greyscale images are stored as RGB. Class names come from the known sets (recognised by their
    label files), else the label numbers.
    """

    kind = "idx"
    on_disk = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.files: dict[tuple[str, str], Path] = {}
        for key, name in IDX_FILES.items():
            found = [self.root / (name + ext) for ext in ("", ".gz") if (self.root / (name + ext)).is_file()]
            if not found:
                raise SourceError(f"'{self.root / name}[.gz]' is missing (an IDX folder needs "
                                  f"{', '.join(IDX_FILES.values())}, each plain or .gz)")
            self.files[key] = found[0]
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        raw_labels = {}
        for split in ("train", "test"):
            images, _ = self._read(split, "images")
            labels, raw_labels[split] = self._read(split, "labels")
            if len(images) != len(labels):
                raise SourceError(f"'{self.files[split, 'images']}' holds {len(images)} images but "
                                  f"'{self.files[split, 'labels']}' {len(labels)} labels")
            self._arrays[split] = (images, labels)
        self.variant, self.class_names = self._recognise(raw_labels["train"])
        for split in ("train", "test"):
            labels = self._arrays[split][1]
            if labels.size and labels.max() >= len(self.class_names):
                raise SourceError(f"'{self.files[split, 'labels']}': label {int(labels.max())} is outside "
                                  f"0..{len(self.class_names) - 1} ({self.variant})")

    def _read(self, split: str, kind: str) -> tuple[np.ndarray, bytes]:
        """The array in one IDX file and the file's bytes as stored; any defect is a SourceError naming it."""
        path = self.files[split, kind]
        stored = path.read_bytes()
        try:
            data = gzip.decompress(stored) if path.suffix == ".gz" else stored
        except (OSError, EOFError, zlib.error) as err:
            raise SourceError(f"'{path}' is not a readable gzip file ({err})") from None
        dims = 3 if kind == "images" else 1
        header = 4 + 4 * dims
        if len(data) < header:
            raise SourceError(f"'{path}' is too short for an IDX header ({len(data)} bytes)")
        magic = struct.unpack(">I", data[:4])[0]
        if magic != IDX_MAGIC[kind]:
            raise SourceError(f"'{path}' has magic number 0x{magic:08x}, expected 0x{IDX_MAGIC[kind]:08x} "
                              f"(IDX {kind}: unsigned bytes, {dims} dimension{'s' if dims > 1 else ''})")
        shape = struct.unpack(f">{dims}I", data[4:header])
        expected = int(np.prod(shape))
        if len(data) - header != expected:
            raise SourceError(f"'{path}' holds {len(data) - header} bytes of data, its header "
                              f"({' x '.join(map(str, shape))}) promises {expected}")
        array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
        return (array if kind == "images" else array.astype(np.int64)), stored

    def _recognise(self, stored_train_labels: bytes) -> tuple[str, list[str]]:
        path = self.files["train", "labels"]
        raw = gzip.decompress(stored_train_labels) if path.suffix == ".gz" else stored_train_labels
        digests = {hashlib.md5(stored_train_labels).hexdigest(), hashlib.sha256(raw).hexdigest()}
        for variant, (names, known) in IDX_SETS.items():
            if digests & known:
                return variant, names
        classes = int(max(int(a[1].max(initial=0)) for a in self._arrays.values())) + 1
        return "unknown", [str(c) for c in range(classes)]

    def items(self) -> Iterator[Item]:
        for split in ("test", "train"):
            for i, label in enumerate(self._arrays[split][1].tolist()):
                yield Item(f"{split}/{i}", int(label), split == "test")

    def read(self, item: Item) -> Inspection:
        split, i = item.ref.split("/")
        grey = self._arrays[split][0][int(i)]
        return inspect_pixels(np.repeat(grey[..., None], 3, axis=2))

    def empty_classes(self) -> list[str]:
        present = set(self._arrays["train"][1].tolist())
        return [n for i, n in enumerate(self.class_names) if i not in present]

    def describe(self) -> dict:
        # Digits, letters and Japanese characters change meaning under a mirror; clothes do not.
        return {"kind": self.kind, "variant": self.variant, "path": str(self.root.resolve()),
                "hflip_preserves_label": self.variant == "fashion-mnist"}


class DigitsSource:
    """scikit-learn's 1,797 8x8 digits, upsampled (bilinear) to 32x32 RGB once, at preparation."""

    kind = "digits"
    on_disk = False
    SIZE = 32

    def __init__(self) -> None:
        from PIL import Image
        from sklearn.datasets import load_digits

        bunch = load_digits()
        self.class_names = [str(d) for d in range(10)]
        self._labels = np.asarray(bunch.target, dtype=np.int64)
        grey = (np.asarray(bunch.images, dtype=np.float64) / 16.0 * 255.0).round().astype(np.uint8)
        big = [np.asarray(Image.fromarray(g).resize((self.SIZE, self.SIZE), Image.BILINEAR)) for g in grey]
        self._pixels = np.repeat(np.stack(big)[..., None], 3, axis=3)

    def items(self) -> Iterator[Item]:
        for i, label in enumerate(self._labels.tolist()):
            yield Item(f"digits/{i}", int(label))

    def read(self, item: Item) -> Inspection:
        return inspect_pixels(self._pixels[int(item.ref.split("/")[1])])

    def empty_classes(self) -> list[str]:
        return []

    def describe(self) -> dict:
        return {"kind": self.kind, "path": "sklearn.datasets.load_digits", "hflip_preserves_label": False}


def open_source(source: str, test_source: Path | None = None, cifar_labels: str = "fine"):
    """``digits``, a CIFAR archive/folder, or an ImageFolder tree, told apart by what is on disk."""
    if source == "digits":
        if test_source is not None:
            raise SourceError("--test-source applies to ImageFolder trees only")
        return DigitsSource()
    path = Path(source)
    if not path.exists():
        raise SourceError(f"SOURCE '{source}' does not exist (expected 'digits', an ImageFolder tree "
                          "or a CIFAR python archive)")
    if path.is_dir() and is_idx_folder(path):
        if test_source is not None:
            raise SourceError("--test-source applies to ImageFolder trees only; IDX folders hold their t10k test files")
        return IdxSource(path)
    looks_cifar = path.is_file() or any((path / d).is_dir() for d in ("cifar-10-batches-py", "cifar-100-python"))
    if looks_cifar:
        if test_source is not None:
            raise SourceError("--test-source applies to ImageFolder trees only; CIFAR ships its own test batch")
        return CifarSource(path, cifar_labels)
    return ImageFolderSource(path, test_source)

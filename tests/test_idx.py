"""MNIST-format IDX folders (MNIST, Fashion-MNIST, KMNIST) as a prepare source: good files and every defect."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_factory import idx_bytes, make_idx
from pipelines.manifest import load_prepared
from pipelines.sources import IdxSource, SourceError
from test_prepare import rows_of, run_prepare

FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_idx_folder_is_prepared_with_its_official_test_split(tmp_path, gz):
    arrays = make_idx(tmp_path / "src", train=50, test=20, classes=4, gz=gz)
    manifest = run_prepare(tmp_path / "src", tmp_path / "ds", seed=3)
    counts = manifest["counts"]
    assert counts["test"]["total"] == 20  # t10k is the test split, not a carved 20%
    assert counts["train"]["total"] + counts["val"]["total"] == 50
    assert counts["val"]["total"] == 10  # round-half-up(20%) per class of the rest: 4 classes x 12-13 -> 3+3+2+2
    assert manifest["classes"] == ["0", "1", "2", "3"]  # an unknown set: its label numbers
    assert manifest["source"]["kind"] == "idx" and manifest["source"]["variant"] == "unknown"
    assert manifest["source"]["hflip_preserves_label"] is False
    # Pixels: every stored test image is the IDX image, grey in all three channels.
    stored = rows_of(tmp_path / "ds", "test")
    images, labels = arrays["test"]
    by_ref = {ref: (img, lab) for ref, img, lab in zip(stored["ref"], stored["image"], stored["label"])}
    for i in range(len(labels)):
        data, label = by_ref[f"test/{i}"]
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        assert pixels.shape == (12, 12, 3) and label == labels[i]
        assert all(np.array_equal(pixels[..., c], images[i]) for c in range(3))
    load_prepared(tmp_path / "ds").verify()


def _corrupt(root: Path, name: str, blob: bytes) -> Path:
    path = root / name
    path.write_bytes(gzip.compress(blob) if name.endswith(".gz") else blob)
    return path


@pytest.mark.parametrize("case", ["magic", "truncated", "count", "missing", "not-gzip", "header"])
def test_each_bad_idx_file_is_one_line_naming_it(tmp_path, case, cli_run):
    root = tmp_path / "src"
    make_idx(root, train=30, test=10)
    images = np.zeros((30, 12, 12), np.uint8)
    if case == "magic":  # a labels file where the images should be
        bad = _corrupt(root, "train-images-idx3-ubyte.gz", idx_bytes(np.zeros(30, np.uint8), 0x801))
        needle = "has magic number 0x00000801, expected 0x00000803"
    elif case == "truncated":
        bad = _corrupt(root, "train-images-idx3-ubyte.gz", idx_bytes(images, 0x803)[:-100])
        needle = "holds 4220 bytes of data, its header (30 x 12 x 12) promises 4320"
    elif case == "count":
        bad = _corrupt(root, "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(9, np.uint8), 0x801))
        needle = "holds 10 images but"
    elif case == "missing":
        (root / "t10k-labels-idx1-ubyte.gz").unlink()
        bad = root / "t10k-labels-idx1-ubyte"
        needle = "is missing"
    elif case == "not-gzip":
        bad = root / "train-labels-idx1-ubyte.gz"
        bad.write_bytes(b"this is not gzip data")
        needle = "is not a readable gzip file"
    else:
        bad = _corrupt(root, "train-labels-idx1-ubyte.gz", b"\x00\x00\x08")
        needle = "is too short for an IDX header"
    with pytest.raises(SourceError) as error:
        IdxSource(root)
    assert str(bad) in str(error.value) and needle in str(error.value)
    result = cli_run("prepare", str(root), str(tmp_path / "out"))
    code, err = result.returncode, result.stderr
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("mlo-mae: error: ") and str(bad) in lines[0] and needle in lines[0]
    assert not (tmp_path / "out").exists()


def test_an_unknown_set_takes_its_classes_from_the_labels(tmp_path):
    root = tmp_path / "src"
    make_idx(root, train=30, test=10)
    labels = np.arange(30) % 4
    labels[7] = 250
    _corrupt(root, "train-labels-idx1-ubyte.gz", idx_bytes(labels.astype(np.uint8), 0x801))
    assert IdxSource(root).class_names == [str(i) for i in range(251)]  # unknown set: max label + 1 classes


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_is_recognised_with_its_class_names():
    source = IdxSource(FASHION)
    assert source.variant == "fashion-mnist"
    assert source.class_names[0] == "T-shirt/top" and source.class_names[9] == "Ankle boot"
    assert source.describe()["hflip_preserves_label"] is True
    assert len(source._arrays["train"][1]) == 60000 and len(source._arrays["test"][1]) == 10000

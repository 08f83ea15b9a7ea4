"""`mlo-mae prepare`: sources to Parquet shards, bad inputs accounted for, splits fixed and stratified."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_factory import make_cifar, make_image_folder
from pipelines.manifest import load_prepared
from pipelines.prepare import SKIPPED_SHOWN, PrepareError, prepare
from test_cli import assert_one_line_error


class _Bar(contextlib.AbstractContextManager):
    def __init__(self, phase: str, total: int) -> None:
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n

    def __exit__(self, *exc) -> None:
        return None


def run_prepare(source, out, **kw) -> dict:
    return prepare(str(source), out, progress=_Bar, log=lambda _: None, **kw)


def rows_of(out: Path, split: str) -> dict[str, list]:
    tables = [pq.read_table(out / s["file"]) for s in json.loads((out / "manifest.json").read_text())["shards"]
              if s["split"] == split]
    return {col: sum((t.column(col).to_pylist() for t in tables), []) for col in ("ref", "label", "id", "image")}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("src") / "tree"
    return root, make_image_folder(root, per_class=100)


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("out") / "ds"
    manifest = run_prepare(tree[0], out, seed=7, shard_rows=50, jobs=2)  # > 256 files: the process pool
    return out, manifest, tree[1]


def test_every_input_is_counted_and_bad_ones_are_reported_with_reasons(prepared):
    out, manifest, planted = prepared
    counts = manifest["counts"]
    stored = sum(counts[s]["total"] for s in ("train", "val", "test"))
    assert stored == planted["kept"]
    assert manifest["skipped"]["total"] == planted["skipped"]
    assert manifest["inputs"] == stored + manifest["skipped"]["total"] == planted["files"]
    by_reason = manifest["skipped"]["by_reason"]
    for reason, paths in planted["planted"].items():
        assert by_reason.get(reason) == len(paths), (reason, by_reason)
    skipped_refs = {s["ref"]: s["reason"] for s in load_prepared(out).skipped()}
    assert len(skipped_refs) == planted["skipped"]
    assert skipped_refs["ant/truncated.jpg"].startswith("corrupt or truncated")
    assert skipped_refs["bee/copy_of_ant_000.jpg"] == "duplicate (same bytes as ant/000.jpg)"
    assert sum(s["rows"] for s in manifest["shards"]) == stored
    assert manifest["empty_classes"] == ["empty_class"]
    assert manifest["classes"] == planted["classes"]
    for split in ("train", "val", "test"):
        assert sum(counts[split]["per_class"].values()) == counts[split]["total"]


def test_modes_are_converted_to_rgb_and_sizes_kept(prepared):
    out, manifest, planted = prepared
    conversions = manifest["image_stats"]["conversions"]
    for reason in planted["converted"]:
        assert any(k.startswith(reason + " ") for k in conversions), (reason, conversions)
    rows = {split: rows_of(out, split) for split in ("train", "val", "test")}
    by_ref = {ref: img for r in rows.values() for ref, img in zip(r["ref"], r["image"])}
    for ref, blob in by_ref.items():
        with Image.open(io.BytesIO(blob)) as img:
            assert img.mode == "RGB", ref
    with Image.open(io.BytesIO(by_ref["bee/depth16.png"])) as img:  # 16-bit ramp scaled, not clipped
        ramp = np.asarray(img)[0, :, 0]
    assert ramp[0] == 0 and ramp[-1] == 255 and len(np.unique(ramp)) > 15
    with Image.open(io.BytesIO(by_ref["ant/huge.jpg"])) as img:
        assert img.size == (2400, 1800)  # resizing belongs to training time
    assert manifest["image_stats"]["width"]["min"] == 1 and manifest["image_stats"]["width"]["max"] == 2400
    assert "bee/caf\\xe9.png" in by_ref  # a non-UTF-8 file name, escaped, not lost
    original = (Path(prepared[2]["planted"]["duplicate"][0]).parent.parent / "ant" / "000.jpg").read_bytes()
    assert by_ref.get("ant/000.jpg", original) == original  # already-RGB files keep their bytes


def test_normalisation_statistics_are_the_mean_over_train_images_of_their_channel_moments(prepared):
    out, manifest, _ = prepared
    means, squares = [], []
    for blob in rows_of(out, "train")["image"]:  # the stored RGB bytes, computed the plain float64 way
        with Image.open(io.BytesIO(blob)) as img:
            x = np.asarray(img, dtype=np.float64).reshape(-1, 3) / 255.0
        means.append(x.mean(0))
        squares.append((x * x).mean(0))
    mean, square = np.mean(means, axis=0), np.mean(squares, axis=0)
    stats = manifest["image_stats"]
    np.testing.assert_allclose(stats["train_channel_mean"], mean, atol=1e-6)
    np.testing.assert_allclose(stats["train_channel_std"], np.sqrt(square - mean**2), atol=1e-6)


def test_splits_are_disjoint_stratified_and_sized(prepared):
    out, manifest, _ = prepared
    rows = {split: rows_of(out, split) for split in ("train", "val", "test")}
    refs = [set(r["ref"]) for r in rows.values()]
    assert not (refs[0] & refs[1]) and not (refs[0] & refs[2]) and not (refs[1] & refs[2])
    for split, r in rows.items():
        assert sorted(r["id"]) == list(range(len(r["id"])))  # ids: 0..n-1 within a split
    for name in ("ant", "bee", "cat"):
        n = {s: manifest["counts"][s]["per_class"][name] for s in ("train", "val", "test")}
        total = sum(n.values())
        assert n["test"] == int(np.floor(0.2 * total + 0.5))
        assert n["val"] == int(np.floor(0.2 * (total - n["test"]) + 0.5))
    train_labels = rows["train"]["label"]
    first_shard = Counter(train_labels[:50])
    assert len(first_shard) == 3  # rows are shuffled across classes, not written class by class


def test_split_is_stable_and_follows_the_seed(tree, prepared, tmp_path):
    out, _, _ = prepared
    again = tmp_path / "again"
    run_prepare(tree[0], again, seed=7, shard_rows=50, jobs=1)  # in-process this time
    other = tmp_path / "other"
    run_prepare(tree[0], other, seed=8, shard_rows=50, jobs=1)
    for split in ("train", "val", "test"):
        a, b = rows_of(out, split), rows_of(again, split)
        assert a["ref"] == b["ref"] and a["image"] == b["image"]
    assert set(rows_of(out, "test")["ref"]) != set(rows_of(other, "test")["ref"])


def test_same_source_again_is_a_no_op_and_a_different_one_is_refused(tree, prepared, tmp_path):
    out, manifest, _ = prepared
    before = (out / "manifest.json").read_text()
    assert run_prepare(tree[0], out, seed=7, shard_rows=50) == json.loads(before)
    assert (out / "manifest.json").read_text() == before
    with pytest.raises(PrepareError, match="already holds a different data set"):
        run_prepare(tree[0], out, seed=9)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(PrepareError, match="is not empty"):
        run_prepare(tree[0], tmp_path / "busy")


def test_fail_mode_names_the_file_and_leaves_nothing_behind(tree, tmp_path, cli_run):
    result = cli_run("prepare", str(tree[0]), str(tmp_path / "out"), "--on-bad-image", "fail", "--jobs", "1")
    assert_one_line_error(result, "ant/empty.jpg': empty file (--on-bad-image fail)")
    assert sorted(os.listdir(tmp_path)) == []


def test_many_skipped_inputs_leave_the_manifest_small_and_are_all_listed_beside_it(tmp_path, cli_run):
    src = tmp_path / "src"
    make_image_folder(src, per_class=10)
    for k in range(300):  # e.g. annotation files next to the images
        (src / "bee" / f"meta_{k:04d}.xml").write_text(f"<annotation>{k}</annotation>\n")
    result = cli_run("prepare", str(src), str(tmp_path / "out"), "--jobs", "1")
    assert result.returncode == 0, result.stderr
    assert f"all listed in {tmp_path / 'out'}/skipped.jsonl" in result.stdout
    data = load_prepared(tmp_path / "out")
    listed = data.skipped()
    assert data.manifest["skipped"]["total"] == len(listed) == 300 + 7  # the 7 bad inputs of make_image_folder
    assert sum(s["ref"].startswith("bee/meta_") and s["reason"] == "not an image" for s in listed) == 300
    assert data.manifest["skipped"]["first"] == listed[:SKIPPED_SHOWN]
    text = (tmp_path / "out" / "manifest.json").read_text()
    assert sum(s["ref"] in text for s in listed) == SKIPPED_SHOWN


def test_a_file_changed_between_the_two_passes_is_refused_and_nothing_is_left(tmp_path):
    src = tmp_path / "src"
    make_image_folder(src, per_class=10)

    class ChangeBeforeWriting(_Bar):
        def __init__(self, phase: str, total: int) -> None:
            super().__init__(phase, total)
            if phase == "writing shards":  # after pass 1 inspected every file, before pass 2 re-reads them
                (src / "cat" / "002.jpg").write_bytes((src / "cat" / "004.jpg").read_bytes())

    with pytest.raises(PrepareError, match=r"cat/002.jpg' changed while it was being prepared; run prepare again"):
        prepare(str(src), tmp_path / "out", progress=ChangeBeforeWriting, log=lambda _: None, jobs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("args,needle", [
    (["prepare", "no/such/dir", "out"], "SOURCE 'no/such/dir' does not exist"),
    (["prepare", "digits", "out", "--test-source", "x"], "--test-source applies to ImageFolder trees only"),
    (["prepare", "digits", "out", "--shard-rows", "0"], "--shard-rows"),
])
def test_prepare_bad_arguments_are_one_line(args, needle, tmp_path, cli_run):
    assert_one_line_error(cli_run(*args, cwd=tmp_path), needle)
    assert not (tmp_path / "out").exists()


def test_empty_tree_is_refused(tmp_path, cli_run):
    (tmp_path / "src" / "a").mkdir(parents=True)
    assert_one_line_error(cli_run("prepare", str(tmp_path / "src"), str(tmp_path / "out")), "holds no files")


def test_official_test_tree_is_the_test_split_and_train_copies_are_dropped(tree, tmp_path):
    test_root = tmp_path / "val_tree"
    make_image_folder(test_root, per_class=10, seed=1)
    leaked = (tree[0] / "ant" / "002.jpg").read_bytes()
    (test_root / "ant" / "leak.jpg").write_bytes(leaked)  # the same image in train and test
    out = tmp_path / "ds"
    manifest = run_prepare(tree[0], out, test_source=test_root, seed=7)
    assert manifest["split_rule"]["test"] == "official"
    test_refs = rows_of(out, "test")["ref"]
    assert all(ref.startswith("test:") for ref in test_refs) and "test:ant/leak.jpg" in test_refs
    reasons = {s["ref"]: s["reason"] for s in load_prepared(out).skipped()}
    assert reasons["ant/002.jpg"] == "duplicate (same bytes as test:ant/leak.jpg)"
    train_and_val = manifest["counts"]["train"]["total"] + manifest["counts"]["val"]["total"]
    assert manifest["counts"]["val"]["total"] == pytest.approx(0.2 * train_and_val, abs=3)


@pytest.mark.parametrize("layout", ["tar.gz", "folder"])
def test_cifar10_archive_keeps_official_test_and_pixel_layout(layout, tmp_path):
    src = tmp_path / ("cifar-10-python.tar.gz" if layout == "tar.gz" else "extracted")
    if layout == "folder":
        src.mkdir()
    arrays = make_cifar(src)
    out = tmp_path / "ds"
    manifest = run_prepare(src, out)
    assert manifest["counts"]["test"]["total"] == len(arrays["test"][0]) == 60
    assert manifest["counts"]["train"]["total"] + manifest["counts"]["val"]["total"] == 200
    assert manifest["counts"]["val"]["total"] == 40  # 20% of 20 per class, 10 classes
    assert manifest["classes"] == [f"c{i}" for i in range(10)]
    test = rows_of(out, "test")
    k = test["ref"].index("test/5")
    with Image.open(io.BytesIO(test["image"][k])) as img:
        pixels = np.asarray(img)
    expected = arrays["test"][0][5].reshape(3, 32, 32).transpose(1, 2, 0)  # R, G, B planes
    assert np.array_equal(pixels, expected) and test["label"][k] == arrays["test"][1][5]


def test_cifar100_coarse_labels(tmp_path):
    src = tmp_path / "cifar-100-python.tar.gz"
    make_cifar(src, variant="cifar100")
    manifest = run_prepare(src, tmp_path / "ds", cifar_labels="coarse")
    assert len(manifest["classes"]) == 20 and manifest["classes"][0] == "k0"
    labels = rows_of(tmp_path / "ds", "train")["label"]
    assert max(labels) < 20 and len(set(labels)) == 20


def test_cifar_pickle_with_code_is_refused(tmp_path):
    src = tmp_path / "extracted"
    src.mkdir()
    make_cifar(src)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (src / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(PrepareError, match="refusing to load"):
        run_prepare(src, tmp_path / "ds")


def test_digits_prepare_through_the_cli(tmp_path, cli_run):
    result = cli_run("prepare", "digits", str(tmp_path / "digits"), "--shard-rows", "300")
    assert result.returncode == 0, result.stderr
    data = load_prepared(tmp_path / "digits")
    assert data.count("train") + data.count("val") + data.count("test") == 1797
    assert len(data.files("train")) == 4  # 1151 rows in shards of 300
    data.verify()
    assert "digits: 10 classes | train 1151, val 287, test 359" in result.stdout

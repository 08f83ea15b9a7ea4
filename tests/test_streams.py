"""Decoding, augmentation and the two readers (Ray Data, PyTorch) over the same shards."""

from __future__ import annotations

import dataclasses
import io
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data_factory import make_image_folder
from pipelines.manifest import load_prepared
from pipelines.streams import Normalizer, level_specs
from pipelines.torch_data import loader
from pipelines.transforms import transform_batch
from test_prepare import run_prepare


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "tree"
    make_image_folder(root, per_class=40)
    out = tmp_path_factory.mktemp("out") / "ds"
    run_prepare(root, out, shard_rows=16, jobs=1)
    return load_prepared(out)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_augmentation_depends_only_on_seed_epoch_and_row():
    rng = np.random.default_rng(0)
    blobs = [_png(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for _ in range(4)]
    batch = {"image": np.array(blobs, dtype=object), "label": np.arange(4), "id": np.array([10, 11, 12, 13])}
    kw = dict(size=16, train=True, mode="rrc", hflip=True, seed=3)
    a = transform_batch(batch, epoch=0, **kw)["image"]
    assert a.shape == (4, 3, 16, 16) and a.dtype == np.uint8
    # Row 12 alone, in another batch, gets the very same crop: independent of batching.
    single = transform_batch({k: v[2:3] for k, v in batch.items()}, epoch=0, **kw)["image"]
    assert np.array_equal(single[0], a[2])
    assert not np.array_equal(transform_batch(batch, epoch=1, **kw)["image"], a)  # new epoch, new crops
    assert not np.array_equal(transform_batch(batch, epoch=0, **{**kw, "seed": 4})["image"], a)


def test_eval_transform_is_deterministic_resize_and_center_crop():
    pixels = np.zeros((64, 128, 3), dtype=np.uint8)
    pixels[:, 32:96] = 255  # a white centre band exactly as wide as the centre crop
    batch = {"image": np.array([_png(pixels)], dtype=object), "label": np.array([0]), "id": np.array([0])}
    out = transform_batch(batch, epoch=0, size=32, train=False, mode="none", hflip=True, seed=0)["image"][0]
    assert out.shape == (3, 32, 32) and out[:, :, 2:-2].min() >= 250  # short side 64 -> 32, centre crop: white


def test_pad_crop_shifts_within_padding():
    pixels = np.full((16, 16, 3), 200, dtype=np.uint8)
    batch = {"image": np.array([_png(pixels)] * 8, dtype=object), "label": np.zeros(8), "id": np.arange(8)}
    out = transform_batch(batch, epoch=0, size=16, train=True, mode="pad-crop", hflip=False, seed=0)["image"]
    zeros = (out == 0).all(axis=1).sum(axis=(1, 2))  # zero padding that entered the crop
    assert zeros.max() > 0 and zeros.max() <= 16 * 16 - 12 * 12
    assert set(np.unique(out)) <= {0, 200}


def test_torch_reader_covers_a_split_once_per_epoch_in_a_new_order(data):
    spec = level_specs(data, 16, "pad-crop", seed=0)["mae"]
    batches = list(loader(data, spec, batch_size=8, drop_last=False))
    labels = torch.cat([y for _, y in batches])
    assert len(labels) == data.count("train")
    assert batches[0][0].dtype == torch.uint8 and batches[0][0].shape[1:] == (3, 16, 16)
    reader = loader(data, spec, batch_size=8)
    reader.dataset.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in reader])[:16], labels[:16])


def test_normalizer_uses_the_manifest_statistics(data):
    norm = Normalizer(data.mean, data.std, "cpu")
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out, _ = norm(x, torch.zeros(2))
    expected = (1.0 - torch.tensor(data.mean)) / torch.tensor(data.std)
    assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-5)


@pytest.fixture(scope="module")
def ray_local(ray_cluster):
    """This process as a driver of the session's cluster."""
    import ray

    from training.launch import init_ray

    init_ray()
    return ray


def test_ray_data_streams_deal_each_epoch_once_resume_exactly_and_match_the_torch_reader(data, ray_local):
    """Two ranks' eval-decoded D_val streams: together they read every row once per epoch, each
    image exactly as the PyTorch reader decodes it; a stream restarted at batch k continues the
    original one batch for batch; the order follows the seed."""
    from pipelines.plan import RankPlan, list_chunks
    from pipelines.ray_data import LevelStream, configure_data_context

    configure_data_context()
    spec = level_specs(data, 16, "pad-crop", seed=0)["mask"]
    n_val = data.count("val")
    ids = [i for f in data.files("val") for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
    images = torch.cat([x for x, _ in loader(data, spec, batch_size=64, shuffle=False, drop_last=False)])
    id_of = {images[k].numpy().tobytes(): ids[k] for k in range(n_val)}
    assert len(id_of) == n_val  # every image distinct, so an image names its row

    def plan(rank: int, seed: int = spec.seed) -> RankPlan:
        return RankPlan(list_chunks(data.files("val"), 2), seed, rank, 2, window_rows=12)

    def rows(rank: int, start: int, stop: int, seed: int = spec.seed) -> list[int]:
        stream = LevelStream(plan(rank, seed), spec, batch_size=3, start_batch=start, stop_batch=stop)
        batches = list(stream)
        assert len(batches) == stop - start
        assert all(x.dtype == torch.uint8 and x.shape == (3, 3, 16, 16) for x, _ in batches)
        return [id_of[img.numpy().tobytes()] for x, _ in batches for img in x]

    epoch_rows = [sum(w.rows for w in plan(r).windows(0)) for r in (0, 1)]
    assert sum(epoch_rows) == n_val and abs(epoch_rows[0] - epoch_rows[1]) <= 2 * max(
        c.rows for c in list_chunks(data.files("val"), 2))
    streams = [rows(r, 0, (epoch_rows[r] + n_val) // 3) for r in (0, 1)]  # more than two epochs each
    first_epoch = streams[0][:epoch_rows[0]] + streams[1][:epoch_rows[1]]
    assert sorted(first_epoch) == list(range(n_val))
    second = streams[0][epoch_rows[0]:epoch_rows[0] + 10]
    assert second != streams[0][:10]  # a new epoch, a new order
    assert rows(0, 5, 9) == streams[0][15:27]  # resumed mid-epoch at batch 5
    assert rows(0, 0, 4, seed=spec.seed + 1) != streams[0][:12]


def test_stage_two_reads_d_tr_as_evaluated_unless_asked_to_augment(data):
    """data.augment_head false (the default): Stage II's images are D_tr's eval-transformed images."""
    augmented = level_specs(data, 16, "pad-crop", seed=0)
    plain = level_specs(data, 16, "pad-crop", seed=0, augment_head=False)
    assert augmented["head"].train and not plain["head"].train
    assert plain["mae"] == augmented["mae"] and plain["mask"] == augmented["mask"]  # the other levels as they were
    for epoch in (0, 1):
        batches = loader(data, plain["head"], batch_size=8, shuffle=False)
        batches.dataset.set_epoch(epoch)
        seen = torch.cat([x for x, _ in batches])
        evaluated = torch.cat([x for x, _ in loader(data, dataclasses.replace(plain["mask"], split="train"),
                                                    batch_size=8, shuffle=False)])
        assert torch.equal(seen, evaluated)  # no crop, no flip, in any epoch

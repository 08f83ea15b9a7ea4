import numpy as np
import torch

from pipelines.digits import load_digits_splits
from pipelines.memory import EndlessLoader
from pipelines.splits import stratified_split


def test_digits_splits_are_disjoint_stratified_and_complete():
    data = load_digits_splits(img_size=32, seed=0)
    idx = data.indices
    assert data.indices.sizes() == {"train": 1149, "val": 288, "test": 360}
    all_idx = np.concatenate([idx.train, idx.val, idx.test])
    assert len(np.unique(all_idx)) == len(all_idx) == 1797
    for (x, y), n in ((data.train, 1149), (data.val, 288), (data.test, 360)):
        assert x.shape == (n, 3, 32, 32) and y.shape == (n,)
        counts = torch.bincount(y, minlength=10).float()
        assert (counts / n - 0.1).abs().max() < 0.02  # ~180 per class overall
    assert abs(float(data.train[0].mean())) < 1e-4 and abs(float(data.train[0].std()) - 1) < 1e-3


def test_split_is_stable_for_a_seed_and_changes_with_it():
    labels = np.repeat(np.arange(5), 40)
    a, b, c = stratified_split(labels, 3), stratified_split(labels, 3), stratified_split(labels, 4)
    assert all(np.array_equal(getattr(a, s), getattr(b, s)) for s in ("train", "val", "test"))
    assert not np.array_equal(a.train, c.train)
    assert np.bincount(labels[a.test]).tolist() == [8] * 5  # 20% of 40 per class
    assert set(np.bincount(labels[a.val]).tolist()) <= {6, 7}  # 20% of the remaining 32 per class
    assert len(a.val) == 32 and len(a.train) == 128


def test_loader_covers_an_epoch_and_resumes_exactly():
    x = torch.arange(20, dtype=torch.float32).reshape(20, 1, 1, 1)
    y = torch.arange(20)
    loader = EndlessLoader(x, y, batch_size=6, seed=1)
    epoch = torch.cat([next(loader)[1] for _ in range(3)])
    assert len(set(epoch.tolist())) == 18  # no repeats within an epoch (ragged tail dropped)
    state = loader.state_dict()
    ahead = [next(loader)[1] for _ in range(5)]
    again = EndlessLoader(x, y, batch_size=6, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(a, next(again)[1]) for a in ahead)

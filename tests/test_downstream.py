"""Downstream evaluation reads the test split once, after every choice was made on D_val.

A prepared data set that records which split each read asks for: the probe and
the fine-tuning must read train and val as they like, then test exactly once,
last. The evaluation sample of pretraining reads D_val only.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from mlo_mae.config import resolve
from mlo_mae.factory import create_mae
from mlo_mae.finetune import FinetuneConfig
from pipelines.manifest import PreparedDataset, load_prepared
from pipelines.prepare import prepare
from training.downstream import eval_sample, finetune_encoder, probe_encoder

from conftest import tiny_model


class _Count:
    def update(self, n: int) -> None:
        pass


class RecordingDataset(PreparedDataset):
    """The real prepared data set; ``files(split)`` also appends ``split`` to ``reads``."""

    def __init__(self, data: PreparedDataset) -> None:
        super().__init__(data.root, data.manifest)
        self.reads: list[str] = []

    def files(self, split: str) -> list[str]:
        self.reads.append(split)
        return super().files(split)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "digits"
    prepare("digits", root, shard_rows=256, progress=lambda *_: contextlib.nullcontext(_Count()),
            log=lambda *_: None)
    return load_prepared(root)


@pytest.fixture
def small_cfg():
    return resolve(overrides={"model.img_size": 16, "model.patch_size": 4, "model.embed_dim": 32,
                              "model.depth": 1, "model.num_heads": 2, "model.decoder_embed_dim": 16,
                              "model.decoder_depth": 1, "model.decoder_num_heads": 2, "run.eval_samples": 50})


def _test_last_once(reads: list[str]) -> None:
    assert reads.count("test") == 1 and reads[-1] == "test", reads
    assert {"train", "val"} <= set(reads[:-1])


def test_probe_reads_test_once_at_the_end(digits, small_cfg):
    data = RecordingDataset(digits)
    torch.manual_seed(0)
    result = probe_encoder(create_mae(small_cfg.model), data, small_cfg)
    _test_last_once(data.reads)
    assert 0.0 <= result.test_top1 <= 1.0 and result.weight_decay > 0


def test_finetune_reads_test_once_after_the_last_epoch(digits, small_cfg):
    data = RecordingDataset(digits)
    epochs = []
    ft = FinetuneConfig(epochs=2, lr=1e-3)
    result = finetune_encoder(create_mae(small_cfg.model), data, small_cfg, ft, batch=128, device="cpu",
                              on_epoch=lambda r: epochs.append(list(data.reads)))
    _test_last_once(data.reads)
    assert len(epochs) == 2 and all("test" not in reads for reads in epochs)
    assert result.test_top1 is not None and len(result.history) == 2


def test_without_test_nothing_reads_it(digits, small_cfg):
    data = RecordingDataset(digits)
    probe = probe_encoder(create_mae(small_cfg.model), data, small_cfg, with_test=False)
    assert probe.test_top1 is None and "test" not in data.reads
    images, labels = eval_sample(data, small_cfg)
    assert set(data.reads) == {"train", "val"}
    assert images.shape == (50, 3, 16, 16) and images.dtype == torch.uint8 and len(labels) == 50


def _blobs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % 3
    centres = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    return centres[labels] + 1.5 * torch.randn(n, 16, generator=gen), labels


def test_probe_is_regularised_logistic_regression_solved_single_threaded(monkeypatch):
    """Against scikit-learn's solver of the same objective (mean cross-entropy + wd/2 |W|^2, bias free) at
    the chosen strength; the solve runs on one thread and the caller's thread count comes back."""
    from sklearn.linear_model import LogisticRegression

    from mlo_mae import probe

    gen = torch.Generator().manual_seed(0)
    train, val, test = _blobs(300, gen), _blobs(200, gen), _blobs(200, gen)
    threads = []
    fit = probe._fit
    monkeypatch.setattr(probe, "_fit", lambda *a, **k: threads.append(torch.get_num_threads()) or fit(*a, **k))
    torch.set_num_threads(2)
    result = probe.linear_probe(train, val, lambda: test, 3)
    assert threads == [1] * len(probe.WEIGHT_DECAYS) and torch.get_num_threads() == 2
    mean, std = train[0].mean(0), train[0].std(0) + 1e-6
    reference = LogisticRegression(C=1 / (len(train[1]) * result.weight_decay), tol=1e-10, max_iter=10_000)
    reference.fit(((train[0] - mean) / std).double().numpy(), train[1].numpy())

    def top1(x, y):
        return float((reference.predict(((x - mean) / std).double().numpy()) == y.numpy()).mean())

    assert abs(result.val_top1 - top1(*val)) <= 1 / len(val[1])
    assert abs(result.test_top1 - top1(*test)) <= 1 / len(test[1])
    assert 0.5 < result.val_top1 < 1.0  # overlapping blobs: neither chance nor trivial


def test_features_are_extracted_in_eval_mode_and_each_mode_comes_back(small_cfg):
    from mlo_mae.probe import extract_features

    mae = create_mae(small_cfg.model).train()
    mae.blocks[0].attn.eval()  # mixed modes: must come back exactly
    before = [m.training for m in mae.modules()]
    seen = []
    mae.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(module.training or mae.training))
    feats = extract_features(mae, torch.randn(5, 3, 16, 16), batch_size=2)
    assert feats.shape == (5, small_cfg.model.embed_dim) and seen == [False] * 3
    assert [m.training for m in mae.modules()] == before


def test_probe_features_are_the_cls_token_or_the_mean_of_the_patch_tokens():
    from mlo_mae.probe import extract_features, pool_features

    torch.manual_seed(0)
    mae = create_mae(tiny_model())
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        tokens = mae.eval().forward_features(x)
    assert torch.allclose(extract_features(mae, x, batch_size=2), tokens[:, 0], atol=1e-6)
    assert torch.allclose(extract_features(mae, x, batch_size=2, pool="mean"), tokens[:, 1:].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="unknown probe features 'max'"):
        pool_features(tokens, "max")


def test_several_probe_features_share_one_pass_and_the_test_split_is_read_once(digits, small_cfg):
    """run.probe_features tokens+mean: the token map (N*d features) is the result, the mean pool its
    'others'; each is the probe linear_probe chooses on those features alone, and test is read once, last."""
    from mlo_mae.probe import extract_features, linear_probe
    from pipelines.streams import Normalizer
    from training.downstream import read_images

    small_cfg.run.probe_features = "tokens+mean"
    data = RecordingDataset(digits)
    torch.manual_seed(0)
    mae = create_mae(small_cfg.model)
    result = probe_encoder(mae, data, small_cfg)
    _test_last_once(data.reads)
    assert result.features == "tokens" and list(result.others) == ["mean"]
    norm = Normalizer(digits.mean, digits.std, "cpu")

    def features(split, pool):
        x, y = read_images(digits, small_cfg, split)
        return extract_features(mae, norm(x, y)[0], pool=pool), y

    assert features("val", "tokens")[0].shape[1] == 16 * 32  # N x d of the small model
    for pool, got in (("tokens", result), ("mean", result.others["mean"])):
        alone = linear_probe(features("train", pool), features("val", pool), lambda: features("test", pool), 10)
        assert (got.val_top1, got.test_top1, got.weight_decay) == (alone.val_top1, alone.test_top1, alone.weight_decay)

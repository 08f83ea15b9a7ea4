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

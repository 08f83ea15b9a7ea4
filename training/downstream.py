"""A pretrained encoder on the prepared splits: linear probe, fine-tuning, the fixed D_val sample.

Single process, the PyTorch reader, no Ray: the end of a pretrain run (rank 0),
``mlo-mae probe`` and ``mlo-mae finetune`` all go through here. Model selection
uses D_val only. The test split is read by ``_test_reader`` alone, which the
probe and the fine-tuning call once, after everything was chosen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from mlo_mae import config as config_mod
from mlo_mae.finetune import (
    EpochResult,
    FinetuneConfig,
    FinetuneResult,
    build_classifier,
    finetune,
)
from mlo_mae.probe import ProbeResult, extract_features, linear_probe
from pipelines.manifest import PreparedDataset
from pipelines.streams import LEVELS, Normalizer, StreamSpec, level_specs
from pipelines.torch_data import loader


def split_spec(data: PreparedDataset, cfg: config_mod.Config, split: str, train: bool = False) -> StreamSpec:
    """How ``split`` is decoded: evaluation transform, or Stage II's augmentation when ``train``."""
    specs = level_specs(data, cfg.model.img_size, cfg.data.augment, cfg.run.seed)
    return dataclasses.replace(specs["head"] if train else specs["mask"], split=split, train=train)


def read_images(data: PreparedDataset, cfg: config_mod.Config, split: str,
                limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` rows of ``split`` in file order (prepare shuffled them), uint8, eval transform."""
    images, labels, count = [], [], 0
    for x, y in loader(data, split_spec(data, cfg, split), 256, shuffle=False, drop_last=False):
        images.append(x)
        labels.append(y)
        count += len(y)
        if limit is not None and count >= limit:
            break
    return torch.cat(images)[:limit], torch.cat(labels)[:limit]


def eval_sample(data: PreparedDataset, cfg: config_mod.Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed D_val images of every periodic evaluation and heatmap."""
    if LEVELS["mask"][0] != "val":
        raise AssertionError("Stage III must read D_val")
    return read_images(data, cfg, "val", cfg.run.eval_samples)


def train_sample(data: PreparedDataset, cfg: config_mod.Config) -> torch.Tensor:
    """The fixed D_tr images (as evaluated, no augmentation) on which C's BatchNorm statistics are
    recomputed before every evaluation (precise BN)."""
    return read_images(data, cfg, "train", cfg.run.eval_samples)[0]


def _features(mae, data: PreparedDataset, cfg: config_mod.Config, split: str, norm: Normalizer):
    feats, labels = [], []
    for images, y in loader(data, split_spec(data, cfg, split), 256, shuffle=False, drop_last=False):
        x, _ = norm(images, y)
        feats.append(extract_features(mae, x))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _test_reader(read: Callable[[str], object]) -> Callable[[], object]:
    """The one way to the test split: a callable that may run once."""
    calls = []

    def test():
        if calls:
            raise RuntimeError("the test split was asked for twice")
        calls.append(1)
        return read("test")

    return test


def probe_encoder(mae, data: PreparedDataset, cfg: config_mod.Config, device: torch.device | str = "cpu",
                  with_test: bool = True) -> ProbeResult:
    """Linear probe on eval-transformed D_tr, its L2 chosen on D_val; the test split scored once, last."""
    norm = Normalizer(data.mean, data.std, device)

    def features(split: str):
        return _features(mae, data, cfg, split, norm)

    test = _test_reader(features) if with_test else None
    return linear_probe(features("train"), features("val"), test, data.num_classes)


def finetune_encoder(mae, data: PreparedDataset, cfg: config_mod.Config, ft: FinetuneConfig, batch: int,
                     device: torch.device | str, on_epoch: Callable[[EpochResult], None] | None = None,
                     with_test: bool = True) -> FinetuneResult:
    """Full fine-tuning of E with a fresh linear head (timm VisionTransformer) on D_tr with Stage II's
    augmentation (crop + flip); the epoch is chosen on D_val; the test split scored once, last."""
    from mlo_mae.export import timm_state_dict

    norm = Normalizer(data.mean, data.std, device)
    model = build_classifier(cfg.model, timm_state_dict(mae), data.num_classes, ft.drop_path).to(device)
    train_data = loader(data, split_spec(data, cfg, "train", train=True), batch, shuffle=True, drop_last=True)
    steps = data.count("train") // batch
    if steps == 0:
        raise ValueError(f"--batch-size {batch} is larger than D_tr ({data.count('train')} images)")

    def train(epoch: int):
        train_data.dataset.set_epoch(epoch)
        return (norm(x, y) for x, y in train_data)

    def split_batches(split: str):
        return (norm(x, y) for x, y in loader(data, split_spec(data, cfg, split), batch, shuffle=False,
                                               drop_last=False))

    test = _test_reader(split_batches) if with_test else None
    return finetune(model, train, lambda: split_batches("val"), test, ft, device, steps, on_epoch)

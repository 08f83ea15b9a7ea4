"""A pretrained encoder on the prepared splits: linear probe, fine-tuning, the fixed D_val sample.

Single process, the PyTorch reader, no Ray: the end of a pretrain run (rank 0),
``mlo-mae probe`` and ``mlo-mae finetune`` all go through here. Model selection
uses D_val only. The test split is read by ``_test_reader`` alone, which the
probe and the fine-tuning call once, after everything was chosen.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from mlo_mae import config as config_mod
from mlo_mae.errors import InputError, Interrupted, RunFailed
from mlo_mae.finetune import (
    EpochResult,
    FinetuneConfig,
    FinetuneResult,
    build_classifier,
    finetune,
)
from mlo_mae.probe import ProbeResult, choose_probe, extract_pools, linear_probe
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


def _features(mae, data: PreparedDataset, cfg: config_mod.Config, split: str, norm: Normalizer,
              pools: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    feats: dict[str, list[torch.Tensor]] = {pool: [] for pool in pools}
    labels = []
    for images, y in loader(data, split_spec(data, cfg, split), 256, shuffle=False, drop_last=False):
        x, _ = norm(images, y)
        for pool, f in extract_pools(mae, x, pools).items():
            feats[pool].append(f)
        labels.append(y)
    return {pool: torch.cat(parts) for pool, parts in feats.items()}, torch.cat(labels)


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
    """Linear probe on eval-transformed D_tr, its L2 chosen on D_val; the test split scored once, last.
    ``run.probe_features`` names what it reads (several joined by '+': the first is the result, the
    others its ``others``); one encoder pass per split serves them all."""
    pools = tuple(cfg.run.probe_features.split("+"))
    norm = Normalizer(data.mean, data.std, device)

    def features(split: str):
        return _features(mae, data, cfg, split, norm, pools)

    (train, y_train), (val, y_val) = features("train"), features("val")
    chosen = {pool: choose_probe((train[pool], y_train), (val[pool], y_val), data.num_classes) for pool in pools}
    test, y_test = _test_reader(features)() if with_test else (None, None)
    results = {pool: ProbeResult(val_top1=c.val_top1, weight_decay=c.weight_decay, features=pool,
                                 test_top1=c.top1(test[pool], y_test) if test is not None else None)
               for pool, c in chosen.items()}
    headline = results.pop(pools[0])
    headline.others = results
    return headline


def probe_pixels(data: PreparedDataset, cfg: config_mod.Config) -> ProbeResult:
    """The same linear probe on the raw pixels (normalised, flattened): what a probe gets with no encoder,
    the reference a pretrained encoder's probe has to beat."""
    norm = Normalizer(data.mean, data.std, "cpu")

    def features(split: str):
        pixels, labels = [], []
        for images, y in loader(data, split_spec(data, cfg, split), 256, shuffle=False, drop_last=False):
            pixels.append(norm(images, y)[0].flatten(1))
            labels.append(y)
        return torch.cat(pixels), torch.cat(labels)

    return linear_probe(features("train"), features("val"), _test_reader(features), data.num_classes)


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


# --- ``mlo-mae probe`` and ``mlo-mae finetune``: an evaluation as an MLflow run ---------------------------

Echo = Callable[[str], None]


@dataclasses.dataclass
class Evaluation:
    """A pretrained encoder, the data set and device it is evaluated on, and the MLflow run that records it."""

    pretrained: object  # training.pretrained.Pretrained
    data: PreparedDataset
    device: torch.device
    uri: str
    run_id: str


def open_evaluation(kind: str, source: str, dataset: str | None, device: str, tracking_uri: str | None,
                    experiment: str, params: dict, echo: Echo) -> Evaluation:
    """The pretrained state, its data set, the device, and an MLflow run ``kind`` for the evaluation: a child
    of the pretrain run when that was tracked (results are logged where it was, unless ``tracking_uri``)."""
    from mlo_mae.engine import resolve_device
    from pipelines.catalog import open_dataset

    from . import tracking
    from .pretrained import load_pretrained

    uri = tracking.tracking_uri(tracking_uri)
    pretrained = load_pretrained(source, uri, prefer_given=tracking_uri is not None)
    try:
        torch_device = resolve_device(device)
    except ValueError as err:
        raise InputError(str(err)) from None
    name = dataset or pretrained.dataset or pretrained.config.data.dataset
    data = open_dataset(name, echo)
    if data.num_classes != pretrained.state["num_classes"] and dataset is None:
        raise InputError(f"--dataset: '{name}' has {data.num_classes} classes, the run trained with "
                         f"{pretrained.state['num_classes']}")
    echo(f"{pretrained.checkpoint} (iteration {pretrained.iteration}, preset {pretrained.config.preset}) | "
         f"{data.manifest['name']}: D_tr {data.count('train')}, D_val {data.count('val')}, "
         f"test {data.count('test')} | device {torch_device}")
    uri = pretrained.tracking_uri or uri
    parent = pretrained.run_id
    try:
        tracking.check_store(uri)
        if parent is not None:
            try:
                mlflow_client = tracking.client(uri)
                experiment = mlflow_client.get_experiment(mlflow_client.get_run(parent).info.experiment_id).name
            except Exception:  # noqa: BLE001 - parent gone: log a standalone run
                parent = None
        run_id = tracking.start_run(uri, experiment, kind, kind, pretrained.config,
                                    {"source.checkpoint": pretrained.checkpoint,
                                     "source.iteration": pretrained.iteration, "dataset.path": str(data.root),
                                     **params}, parent=parent, dataset=data)
    except tracking.TrackingError as err:
        raise InputError(f"--tracking-uri: {err}") from None
    return Evaluation(pretrained, data, torch_device, uri, run_id)


@contextlib.contextmanager
def recorded(evaluation: Evaluation, warn: Echo):
    """The evaluation's MLflow run ends FAILED or KILLED if the body fails or is interrupted (never RUNNING);
    a data or value error becomes one line; on success the caller ends it with ``finish``."""
    from . import tracking

    try:
        yield
    except KeyboardInterrupt:
        tracking.end_run(evaluation.uri, evaluation.run_id, "KILLED", warn)
        raise Interrupted("interrupted") from None
    except Exception as err:
        tracking.end_run(evaluation.uri, evaluation.run_id, "FAILED", warn)
        if isinstance(err, (ValueError, OSError)):  # a damaged shard, a non-finite loss: the work failed
            raise RunFailed(" ".join(str(err).split())[:400]) from None
        raise


def finish(evaluation: Evaluation, kind: str, results: dict[str, float], headline: dict[str, float], step: int,
           warn: Echo) -> None:
    """Log ``results`` at ``step``, copy ``headline`` onto the pretrain run as ``KIND/NAME`` (its row in
    'mlo-mae runs' and the UI's table shows the evaluation) and end the evaluation's run."""
    from . import tracking

    logger = tracking.RunLogger(evaluation.uri, evaluation.run_id, warn)
    logger.metrics(results, step)
    logger.flush()
    pretrained = evaluation.pretrained
    if pretrained.run_id is not None:
        parent = tracking.RunLogger(evaluation.uri, pretrained.run_id, warn)
        parent.metrics({f"{kind}/{k}": v for k, v in headline.items()}, pretrained.iteration)
        parent.flush()
    tracking.end_run(evaluation.uri, evaluation.run_id, "FINISHED", warn)


def run_probe(source: str, dataset: str | None, device: str, tracking_uri: str | None, experiment: str,
              echo: Echo, warn: Echo) -> tuple[Evaluation, ProbeResult]:
    """``mlo-mae probe``: the linear probe of a pretrained encoder, recorded as an MLflow run 'probe'."""
    evaluation = open_evaluation("probe", source, dataset, device, tracking_uri, experiment, {}, echo)
    with recorded(evaluation, warn):
        result = probe_encoder(evaluation.pretrained.encoder(evaluation.device), evaluation.data,
                               evaluation.pretrained.config, evaluation.device)
    headline = {"val_top1": result.val_top1, "test_top1": result.test_top1}
    for name, other in result.others.items():  # further features: mean/test_top1, ...
        headline.update({f"{name}/val_top1": other.val_top1, f"{name}/test_top1": other.test_top1})
    finish(evaluation, "probe", {**headline, "weight_decay": result.weight_decay}, headline,
           evaluation.pretrained.iteration, warn)
    return evaluation, result


def run_finetune(source: str, dataset: str | None, device: str, tracking_uri: str | None, experiment: str,
                 ft: FinetuneConfig, batch: int, echo: Echo, warn: Echo) -> tuple[Evaluation, FinetuneResult]:
    """``mlo-mae finetune``: full fine-tuning of a pretrained encoder, recorded as an MLflow run 'finetune'
    with a point per epoch (epochs count from 1, on screen and in MLflow)."""
    from . import tracking

    params = {**{f"finetune.{k}": v for k, v in dataclasses.asdict(ft).items()}, "finetune.batch_size": batch}
    evaluation = open_evaluation("finetune", source, dataset, device, tracking_uri, experiment, params, echo)
    logger = tracking.RunLogger(evaluation.uri, evaluation.run_id, warn)
    best = {"top1": -1.0, "epoch": 0}

    def on_epoch(result: EpochResult) -> None:
        if result.val_top1 > best["top1"]:
            best.update(top1=result.val_top1, epoch=result.epoch + 1)
        echo(f"epoch {result.epoch + 1}/{ft.epochs} | loss {result.train_loss:.4f} | D_val top-1 "
             f"{100 * result.val_top1:.1f}% (best {100 * best['top1']:.1f}% at epoch {best['epoch']}) | "
             f"lr {result.lr:.2e} | {result.seconds:.1f}s")
        logger.metrics({"train_loss": result.train_loss, "val_top1": result.val_top1, "lr": result.lr},
                       result.epoch + 1)
        logger.flush()

    with recorded(evaluation, warn):
        result = finetune_encoder(evaluation.pretrained.encoder(evaluation.device), evaluation.data,
                                  evaluation.pretrained.config, ft, batch, evaluation.device, on_epoch)
    finish(evaluation, "finetune", {"test_top1": result.test_top1, "best_epoch": result.best_epoch + 1},
           {"val_top1": result.val_top1, "test_top1": result.test_top1}, ft.epochs, warn)
    return evaluation, result

"""What each Ray Train worker runs: the engine fed by its shard of the three level streams.

Rank 0 alone prints progress (through a queue to the driver), writes
checkpoints and runs the final linear probe.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import ray.train
import torch

from mlo_mae import config as config_mod
from mlo_mae.checkpoint import save_atomic
from mlo_mae.engine import MLOEngine, resolve_device
from mlo_mae.loop import fit, format_progress
from mlo_mae.probe import extract_features, linear_probe
from pipelines.manifest import load_prepared
from pipelines.ray_data import EndlessStream
from pipelines.streams import LEVELS, Normalizer, level_specs, normalized


def total_iterations(cfg: config_mod.Config, train_rows: int) -> int:
    """``run.max_steps``, else enough iterations for ``run.epochs`` passes of Stage I over D_tr."""
    if cfg.run.max_steps:
        return cfg.run.max_steps
    return max(1, math.ceil(cfg.run.epochs * train_rows / (cfg.data.batch_mae * cfg.mlo.unroll_mae)))


def batch_size(cfg: config_mod.Config, level: str) -> int:
    return getattr(cfg.data, f"batch_{level}")


def _features(mae, data, spec, norm: Normalizer, batch_size: int = 256):
    from pipelines.torch_data import loader

    feats, labels = [], []
    for images, y in loader(data, spec, batch_size, shuffle=False, drop_last=False):
        x, _ = norm(images, y)
        feats.append(extract_features(mae, x, batch_size))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def probe_encoder(mae, data, cfg: config_mod.Config, norm: Normalizer):
    """Linear probe on eval-transformed D_tr / D_val; the test split is read here, once, at the end."""
    specs = level_specs(data, cfg.model.img_size, cfg.data.augment, cfg.run.seed)
    evaluate = {split: dataclasses.replace(specs["mask"], split=split, train=False)
                for split in ("train", "val", "test")}
    feats = {split: _features(mae, data, spec, norm) for split, spec in evaluate.items()}
    return linear_probe(feats["train"], feats["val"], feats["test"], data.num_classes)


def train_loop_per_worker(params: dict[str, Any]) -> None:
    cfg = config_mod.from_dict(params["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(params["threads"])
    device = resolve_device(cfg.run.device)
    if device.type == "cuda":
        device = ray.train.torch.get_device()
    progress = params.get("progress")

    def say(kind: str, text: Any) -> None:
        if rank == 0 and progress is not None:
            progress.put((kind, text))

    data = load_prepared(params["dataset_path"])
    total = total_iterations(cfg, data.count("train"))
    specs = level_specs(data, cfg.model.img_size, cfg.data.augment, cfg.run.seed)
    norm = Normalizer(data.mean, data.std, device)
    raw = {level: EndlessStream(ray.train.get_dataset_shard(level), batch_size(cfg, level), specs[level].seed)
           for level in LEVELS}
    streams = {level: normalized(stream, norm) for level, stream in raw.items()}
    engine = MLOEngine(cfg, data.num_classes, total, device)
    out = params.get("output")

    def save() -> None:
        if out and rank == 0:
            save_atomic({"engine": engine.state_dict()}, os.path.join(out, "checkpoint.pt"))

    def on_log(stats, prog) -> None:
        images = prog.step * (cfg.data.batch_mae * cfg.mlo.unroll_mae) * world
        say("log", format_progress(stats, prog) + f" | {images / max(prog.elapsed_s, 1e-9):.0f} img/s")
        ray.train.report({"iteration": prog.step, "loss_mae": stats.loss_mae, "loss_head": stats.loss_head,
                          **({"loss_val": stats.loss_val} if stats.loss_val is not None else {})})

    start = time.perf_counter()
    try:
        fit(engine, streams, cfg.run.log_every, on_log, cfg.run.checkpoint_every, save)
    except FloatingPointError as err:  # NaN/inf at some level: the last periodic checkpoint stays
        say("error", f"training stopped: {err}")
        raise
    finally:
        for stream in raw.values():
            stream.close()
    save()
    metrics: dict[str, Any] = {"iteration": engine.iteration, "train_seconds": time.perf_counter() - start}
    if rank == 0 and cfg.run.probe:
        result = probe_encoder(engine.mae, data, cfg, norm)
        metrics.update(probe_val_top1=result.val_top1, probe_test_top1=result.test_top1)
        say("log", f"linear probe (frozen encoder, L2 {result.weight_decay:g} chosen on D_val): "
                   f"D_val top-1 {100 * result.val_top1:.1f}% | test top-1 {100 * result.test_top1:.1f}%")
    say("metrics", metrics)
    ray.train.report(metrics)

"""Rank 0's record of a pretrain run in MLflow: per-step metrics, evaluations with heatmaps, the end.

Heatmaps are logged with ``log_image(key, step)``, so the MLflow UI shows each
kind with a step slider and can put an MLO run beside a baseline run; the same
figures go to ``heatmaps/KIND/step-NNNNNN.png`` too, since the UI files those
under generated names and its cards show 256-pixel thumbnails. The evaluation
history (small per-patch maps) is part of the checkpoint, so that the final
evolution GIF covers the whole run even after a restart.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from mlo_mae import config as config_mod
from mlo_mae.engine import MLOEngine, StepStats
from mlo_mae.evaluation import Evaluation, condensed, evaluate, expand
from mlo_mae.export import save_encoder
from mlo_mae.heatmaps import HeatmapRenderer, MaskSnapshot, render_evolution, save_gif, strip_indices
from mlo_mae.probe import ProbeResult
from pipelines.manifest import PreparedDataset
from pipelines.streams import Normalizer

from .downstream import eval_sample, train_sample
from .tracking import RunLogger

HEATMAP_KEYS = {"mean": "heatmaps/mask_mean", "panel": "heatmaps/mask_panel", "classes": "heatmaps/mask_classes"}
GIF_FRAMES = 100


def figure_path(key: str, step: int | None = None) -> str:
    """Where a heatmap is filed under a readable name: ``heatmaps/mask_panel/step-000050.png``, or the
    last evaluation's ``heatmaps/final/mask_panel.png``."""
    folder, kind = key.rsplit("/", 1)
    return f"{folder}/{kind}/step-{step:06d}.png" if step is not None else f"{folder}/final/{kind}.png"


def history_snapshots(history: list[dict[str, Any]], sample_size: int,
                      max_frames: int = GIF_FRAMES) -> list[MaskSnapshot]:
    """At most ``max_frames`` evenly spaced saved evaluations as snapshots whose titles count the images
    the maps are over (``sample_size`` for entries saved before the count was)."""
    kept = [history[i] for i in strip_indices(len(history), max_frames)]
    return [replace(expand(h), sample_size=int(h.get("images", sample_size))) for h in kept]


def step_metrics(stats: StepStats) -> dict[str, float | None]:
    """One iteration's numbers under their MLflow names (None: not measured in this mode or step)."""
    return {"train/loss_mae": stats.loss_mae, "train/loss_head": stats.loss_head, "train/loss_val": stats.loss_val,
            "train/val_top1_batch": stats.val_top1, "train/hypergrad_norm": stats.hypergrad_norm,
            "hypergrad/path_ratio": stats.path_ratio,
            "mask/entropy": stats.mask_entropy, "mask/mean_prob": stats.mask_mean_prob,
            "mask/mean_prob_masked": stats.mask_mean_prob_masked, "mask/saturated": stats.mask_saturated,
            "mask/ratio": stats.mask_ratio, "lr/mae": stats.lr_mae, "lr/head": stats.lr_head,
            "lr/mask": stats.lr_mask}


class Recorder:
    def __init__(self, logger: RunLogger | None, engine: MLOEngine, data: PreparedDataset,
                 cfg: config_mod.Config, norm: Normalizer, say: Callable[[str], None]) -> None:
        self.logger, self.engine, self.cfg, self.norm, self.say = logger, engine, cfg, norm, say
        self.images, self.labels = eval_sample(data, cfg)
        self.train_images = train_sample(data, cfg)
        self.head = None  # C with precise statistics, from the last evaluation (exported at the end)
        self.renderer = HeatmapRenderer(class_names=data.class_names)  # the figures, laid out once per run
        self.history: list[dict[str, Any]] = []
        self.figures: dict[str, Image.Image] = {}  # the last evaluation's heatmaps, filed again at the end

    def placement(self, nodes: list[str]) -> None:
        """The Ray node id of every rank, as tags (a restarted worker group may land elsewhere: tags, unlike
        params, may change): ``ray.nodes`` (how many) and ``ray.node.rank<i>``."""
        if self.logger is not None:
            tags = {"ray.nodes": str(len(set(nodes))), **{f"ray.node.rank{i}": node for i, node in enumerate(nodes)}}
            self.logger.tags(tags)

    def step(self, stats: StepStats, images_per_s: float, data_wait: float) -> None:
        if self.logger is not None:
            self.logger.metrics({**step_metrics(stats), "perf/images_per_s": images_per_s,
                                 "perf/data_wait": data_wait}, self.engine.iteration)

    def evaluate(self) -> Evaluation:
        """D_val top-1 on the fixed sample and the three heatmaps, logged at the current step."""
        ev = evaluate(self.engine, self.images, self.labels, self.norm, self.train_images)
        self.head = ev.head
        self.history = [h for h in self.history if h["step"] < ev.step] + [
            {**condensed(ev.snapshot), "images": ev.snapshot.image_count, "val_top1": ev.val_top1,
             "val_loss": ev.val_loss}]
        if self.logger is not None:
            self.logger.metrics(ev.metrics(), ev.step)
            self.logger.flush()
            snap = ev.snapshot

            def heatmaps() -> None:  # a drawing error must not stop training either
                self.figures = {HEATMAP_KEYS[kind]: image for kind, image in self.renderer.render(snap).items()}
                for key, image in self.figures.items():
                    self.logger.client.log_image(self.logger.run_id, image, key=key, step=ev.step)
                    self.logger.client.log_image(self.logger.run_id, image, artifact_file=figure_path(key, ev.step))

            self.logger.guarded("heatmaps", heatmaps)
        return ev

    def latest(self) -> dict[str, float]:
        """The last evaluation's numbers (kept in checkpoints): every report carries them, for Tune's ASHA."""
        last = self.history[-1] if self.history else {}
        return {k: float(last[k]) for k in ("val_top1", "val_loss") if k in last}

    def flush(self) -> None:
        if self.logger is not None:
            self.logger.flush()

    def finish(self, metrics: dict[str, Any], probe: ProbeResult | None) -> None:
        """The evolution GIF and strip, the encoder for timm, the end-of-run numbers."""
        if self.logger is None:
            return
        values = {"train_seconds": metrics.get("train_seconds")}
        if probe is not None:
            values.update({"probe/val_top1": probe.val_top1, "probe/test_top1": probe.test_top1})
            for name, other in probe.others.items():  # further features: probe/mean/test_top1, ...
                values.update({f"probe/{name}/val_top1": other.val_top1, f"probe/{name}/test_top1": other.test_top1})
        self.logger.metrics(values, self.engine.iteration)
        self.logger.flush()
        with tempfile.TemporaryDirectory(prefix="mlo-mae-artifacts-") as folder:
            heatmaps = os.path.join(folder, "heatmaps")
            os.makedirs(os.path.join(heatmaps, "final"))
            if self.history:  # at most GIF_FRAMES evenly spaced frames: ~1 MB each in memory
                frames, strip = render_evolution(history_snapshots(self.history, len(self.images)))
                save_gif(frames, os.path.join(heatmaps, "mask_evolution.gif"))
                strip.save(os.path.join(heatmaps, "mask_strip.png"))
            for key, image in self.figures.items():
                image.save(os.path.join(folder, figure_path(key)))
            self.logger.artifacts(heatmaps, "heatmaps")
            model_dir = os.path.join(folder, "model")
            save_encoder(self.engine.mae, self.cfg.model, model_dir, head=self.head)
            self.logger.artifacts(model_dir, "model")
        self.renderer.close()

    def state_dict(self) -> dict[str, Any]:
        return {"evaluations": [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in h.items()}
                                for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("evaluations", []))

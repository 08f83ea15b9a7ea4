"""The three-level MLO-MAE engine: one object, one ``step()`` per iteration.

Names, as in METHOD.md: E and D the MAE encoder and decoder, C the head, T the
masking network; D_tr and D_val the two parts of the labelled training set.
Each level also has a key, its name in configs, checkpoints and metrics
(``unroll_mae``, ``lr_mask``, ``level_steps["head"]``), kept as it is:

    level      trains  module    key     reads  loss
    Stage I    E, D    mae       "mae"   D_tr   L_I: reconstruction, weighted by T
    Stage II   C       head      "head"  D_tr   L_II: cross-entropy on whole images
    Stage III  T       masknet   "mask"  D_val  L_val (L_III in the progress line): C's cross-entropy

An iteration runs ``unroll_mae`` Stage-I steps, ``unroll_head`` Stage-II steps
and ``unroll_mask`` Stage-III steps (see ``MLOConfig``). In baseline mode T is
never used: masks are uniformly random (or follow a pixel rule,
``mlo.baseline_rule``) and Stage III does not run (plain MAE, with C still
trained for monitoring). With ``optim.lr_mask: 0`` T masks but never learns:
Stage III does not run either.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import Config, from_dict, lr_scale, trains_mask
from .distributed import Sync, no_sync
from .factory import create_models
from .head import cross_entropy
from .hypergradient import exact_hypergradient, horizon_hypergradient, hyper_direction, t_scores
from .mask_metrics import mean_entropy, mean_masked_prob, saturated_fraction
from .masking import Mask, masks_for, select_mask, weighted_reconstruction_loss
from .optim import build_adamw, set_lr, warmup_cosine
from .seeding import seeded, stream_seed

LEVELS = ("mae", "head", "mask")
LEVEL_NAMES = {"mae": "Stage-I (reconstruction)", "head": "Stage-II (classification)",
               "mask": "Stage-III (validation)"}
STATE_FORMAT = 1

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepStats:
    """What one iteration measured (plain floats, for logging)."""

    iteration: int
    loss_mae: float
    loss_head: float
    loss_val: float | None = None
    val_top1: float | None = None
    hypergrad_norm: float | None = None
    mask_entropy: float | None = None  # mean binary entropy of T's probabilities (nats)
    mask_mean_prob: float | None = None  # mean of T's probabilities
    mask_ratio: float = 0.0  # realised: fraction of patches actually masked (after rounding)
    mask_saturated: float | None = None  # share of T's probabilities below 0.01 or above 0.99
    mask_mean_prob_masked: float | None = None  # mean of T's probabilities over the masked patches
    path_ratio: float | None = None  # ||eta_C H u|| / ||v||: the path through C against the path through E
    lr_mae: float = 0.0
    lr_head: float = 0.0
    lr_mask: float = 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


class NonFiniteLossError(FloatingPointError):
    """A level produced NaN or inf; the message names the level and step."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


class MLOEngine:
    """Owns E+D, C and T, their optimisers, schedules, counters and RNG state."""

    def __init__(self, cfg: Config, num_classes: int, total_steps: int,
                 device: torch.device | str = "cpu", sync: Sync = no_sync,
                 dtype: torch.dtype = torch.float32, rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.rank = rank
        self.num_classes = num_classes
        self.total_steps = total_steps
        self.device = torch.device(device)
        self.sync = sync
        if cfg.run.precision == "bf16" and self.device.type != "cuda":
            raise ValueError("precision bf16 needs a CUDA device; use fp32 on CPU")
        torch.manual_seed(cfg.run.seed)
        models = create_models(cfg.model, num_classes)
        self.mae = models.mae.to(self.device, dtype)
        self.head = models.head.to(self.device, dtype)
        self.masknet = models.masknet.to(self.device, dtype)
        o = cfg.optim
        self.optimizers = {
            "mae": build_adamw(self.mae, o.lr_mae, o.weight_decay_mae, o.betas),
            "head": build_adamw(self.head, o.lr_head, o.weight_decay_head, o.betas),
            "mask": build_adamw(self.masknet, o.lr_mask, o.weight_decay_mask, o.betas),
        }
        scale = lr_scale(o.lr_scaling, world_size)  # lrs are given for one worker's batch
        self.base_lr = {"mae": o.lr_mae * scale, "head": o.lr_head * scale, "mask": o.lr_mask * scale}
        self.iteration = 0
        self.level_steps = {level: 0 for level in LEVELS}
        self.head_queue: list[Batch] = []  # head_reuse: (CLS features, labels) of the last Stage-II batches
        self.path_ratio: float | None = None  # of the last hypergradient, on the iterations that measure it

    # ----- one iteration -----
    def step(self, batches: Mapping[str, Iterator[Batch]]) -> StepStats:
        """One iteration: Stages I, II and III in turn. ``batches`` maps each level key to an
        endless iterator: 'mae' and 'head' over D_tr, 'mask' over D_val.

        Its randomness (baseline masks, dropout, drop-path) is seeded from (seed, rank,
        iteration): a resumed or restarted run draws what the uninterrupted one drew.
        """
        mlo = trains_mask(self.cfg)
        with seeded(stream_seed("iteration", self.cfg.run.seed, self.rank, self.iteration), self.device):
            for module in (self.mae, self.head, self.masknet):
                module.train()

            # Stage I: E, D on D_tr, masked by T (at random in baseline mode). The last batch is the one
            # whose L_I the hypergradient differentiates.
            stage1 = []
            for _ in range(self.unroll("mae")):
                stage1_images = next(batches["mae"])[0]
                stage1.append(self.mae_step(stage1_images))

            # Stage II: C on D_tr, E fixed; the hypergradient's C path goes through the last batch. With
            # fd, that batch shares one encoder pass (and its graph) with the first Stage-III batch. With
            # head_reuse, it is the iteration's only fresh batch: C first steps on the kept features of the
            # previous iterations' batches.
            share = mlo and self.cfg.mlo.hypergradient == "fd"
            fresh = self.batches_per_iteration("head")
            losses_ii, stage3_batch, shared = [], None, None
            for j in range(fresh):
                stage2_batch = next(batches["head"])
                if share and j == fresh - 1:
                    stage3_batch = next(batches["mask"])
                    shared = self._shared_features(stage2_batch, stage3_batch)
                    features = shared[0]
                else:
                    with torch.no_grad(), self._autocast():
                        features = self.mae.forward_features(stage2_batch[0])
                if j == fresh - 1:
                    for kept, labels in self._reused_head_batches(features, stage2_batch[1]):
                        losses_ii.append(self.head_step(kept, labels))
                losses_ii.append(self.head_step(features, stage2_batch[1]))

            # Stage III: T on D_val, through the last Stage-I and Stage-II batches.
            stage3 = []
            if mlo:
                for k in range(self.unroll("mask")):
                    if k > 0 or stage3_batch is None:
                        stage3_batch, shared = next(batches["mask"]), None
                    stage3.append(self.mask_step(stage1_images, stage2_batch, stage3_batch, shared))

        # What the iteration measured: each stage's mean over its steps.
        stats = StepStats(iteration=self.iteration, loss_mae=_mean([loss for loss, _ in stage1]),
                          loss_head=_mean(losses_ii))
        for key in stage1[0][1]:
            setattr(stats, key, _mean([masking[key] for _, masking in stage1]))
        if stage3:
            stats.loss_val, stats.val_top1, stats.hypergrad_norm = (_mean(column) for column in zip(*stage3))
            stats.path_ratio = self.path_ratio
        self.iteration += 1
        stats.lr_mae, stats.lr_head, stats.lr_mask = (self.last_lr(level) for level in LEVELS)
        return stats

    # ----- the three stages -----
    def learned_fraction(self) -> float:
        """``mixed``: the share of the masked patches T chooses now, ramped linearly from 0 at the first
        iteration to ``mlo.learned_fraction`` at the last (HPM's schedule)."""
        progress = min(self.iteration / max(self.total_steps - 1, 1), 1.0)
        return self.cfg.mlo.learned_fraction * progress

    def choose_mask(self, images: torch.Tensor, generator: torch.Generator | None = None,
                    ) -> tuple[torch.Tensor | None, Mask]:
        """T's scores p (None without T) and the mask Stage I trains with now (``masking.masks_for``)."""
        return masks_for(self.mae, self.masknet, images, self.cfg.mlo, self.learned_fraction(), generator)

    def mae_step(self, images: torch.Tensor) -> tuple[float, dict[str, float]]:
        """One Stage-I step on (E, D); returns L_I and what the mask looked like."""
        with self._autocast():
            if self.masknet.centre and not self.cfg.mlo.baseline:
                with torch.no_grad():
                    batch_mean = self.mae.embed_patches(images).float().mean(0)
                self.sync([batch_mean])  # one running mean on every rank
                self.masknet.track_input(batch_mean)
            probs, mask = self.choose_mask(images)
            masking = {"mask_ratio": float(mask.mask.float().mean())}
            if probs is not None:
                masking.update(mask_entropy=mean_entropy(probs), mask_mean_prob=float(probs.detach().mean()),
                               mask_saturated=saturated_fraction(probs),
                               mask_mean_prob_masked=mean_masked_prob(probs, mask.mask))
            errors = self.mae(images, mask.ids_keep, mask.ids_restore)
            loss = weighted_reconstruction_loss(errors, mask.mask, probs, self.cfg.mlo.stage1_norm, mask.learned)
        self.optimizers["mae"].zero_grad(set_to_none=True)
        loss.backward()
        return self._optimizer_step("mae", loss), masking

    def head_step(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """One Stage-II step on C, on encoder features of whole D_tr images (E is fixed here); returns L_II."""
        with self._autocast():
            loss = cross_entropy(self.head(features.detach()), labels)
        self.optimizers["head"].zero_grad(set_to_none=True)
        loss.backward()
        return self._optimizer_step("head", loss)

    def mask_step(self, stage1_images: torch.Tensor, stage2_batch: Batch, stage3_batch: Batch,
                  features: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[float, float, float]:
        """One Stage-III step on T; returns L_val, D_val top-1 of the batch and ||g_T||."""
        grads, loss_val, logits = self.hypergradient(stage1_images, stage2_batch, stage3_batch, features)
        params = list(self.masknet.parameters())
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        value = self._optimizer_step("mask", loss_val)
        norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params)))  # of the averaged g_T
        top1 = float((logits.argmax(-1) == stage3_batch[1]).float().mean())
        return value, top1, norm

    def hypergradient(self, stage1_images: torch.Tensor, stage2_batch: Batch, stage3_batch: Batch,
                      features: tuple[torch.Tensor, torch.Tensor] | None = None,
                      ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """g_T (T's parameter order), L_val and the D_val logits at the current state.

        A pure function of (state, batches): its randomness is seeded from the run seed
        and the step counters, and no parameter is modified. ``features`` may carry the
        encoder pass that Stage II shared with Stage III (with its graph).
        """
        cfg = self.cfg.mlo
        seed = stream_seed("hypergradient", self.cfg.run.seed, self.iteration, self.level_steps["mask"])
        lr_mae, lr_head = self.last_lr("mae"), self.last_lr("head")
        # eta_E of the virtual steps: divided out again for K = 1, it sets the horizon's reach for K > 1
        virtual_lr = lr_mae if lr_mae > 0 else self.base_lr["mae"]
        with seeded(seed, self.device):
            probs = t_scores(self.mae, self.masknet, stage1_images)  # with T's graph
            # the mask is drawn once: every pass and both modes see it
            mask = select_mask(probs.detach(), cfg.mask_ratio, cfg.selection, self.learned_fraction())
            if cfg.hypergradient == "exact":
                self.path_ratio = None
                grads, loss_val = exact_hypergradient(
                    self.mae, self.head, self.masknet, stage1_images, stage2_batch, stage3_batch,
                    mask, virtual_lr, lr_head, cfg.stage1_norm, cfg.horizon, probs)
                with torch.no_grad(), self.head.frozen_statistics():
                    logits = self.head(self.mae.forward_features(stage3_batch[0]))
                return grads, loss_val, logits
            f2, f3 = features if features is not None else self._shared_features(stage2_batch, stage3_batch)
            with self._autocast():
                # The two paths are measured (one more encoder backward) on the iterations the worker logs.
                measure = (self.iteration + 1) % self.cfg.run.log_every == 0
                direction = hyper_direction(self.mae, self.head, f2, stage2_batch[1], f3, stage3_batch[1],
                                            lr_head, self.sync, split=measure)
                with torch.no_grad(), self.head.frozen_statistics():
                    logits = self.head(f3.detach())
            self.path_ratio = direction.c_path_norm / direction.e_path_norm if direction.e_path_norm else None
            grads = horizon_hypergradient(self.mae, self.masknet, stage1_images, direction.w, mask, virtual_lr,
                                          cfg.horizon, cfg.fd_alpha, seed, cfg.stage1_norm, probs)
        return grads, direction.loss_val, logits

    def _reused_head_batches(self, features: torch.Tensor, labels: torch.Tensor) -> list[Batch]:
        """With ``head_reuse``: the kept (CLS features, labels) of the previous ``unroll_head - 1`` Stage-II
        batches, oldest first (the fresh batch fills the places of a run's first iterations); the fresh
        batch is kept for the next iterations."""
        keep = self.unroll("head") - 1
        if not self.cfg.mlo.head_reuse or keep == 0:
            return []
        fresh = (features[:, :1].detach().clone(), labels)
        reused = [fresh] * (keep - len(self.head_queue)) + self.head_queue
        self.head_queue = (self.head_queue + [fresh])[-keep:]
        return reused

    # ----- schedule -----
    def unroll(self, level: str) -> int:
        m = self.cfg.mlo
        return {"mae": m.unroll_mae, "head": m.unroll_head, "mask": m.unroll_mask}[level]

    def batches_per_iteration(self, level: str) -> int:
        """Batches an iteration draws from the level's stream (the data position is iteration x this)."""
        if level == "mask" and not trains_mask(self.cfg):
            return 0
        if level == "head" and self.cfg.mlo.head_reuse:
            return 1
        return self.unroll(level)

    def batches_drawn(self, level: str) -> int:
        """Batches drawn from the level's stream so far: where a resumed stream starts."""
        return self.iteration * self.batches_per_iteration(level)

    def level_total(self, level: str) -> int:
        """Optimiser steps this level takes over the whole run (its cosine's length)."""
        return self.total_steps * self.unroll(level)

    def lr(self, level: str, step: int | None = None) -> float:
        total = self.level_total(level)
        warmup = int(round(self.cfg.optim.warmup_fraction * total))
        step = self.level_steps[level] if step is None else step
        if level == "head" and self.cfg.optim.schedule_head == "constant":
            return self.base_lr[level] * min(1.0, (step + 1) / warmup) if warmup else self.base_lr[level]
        return warmup_cosine(step, total, warmup, self.base_lr[level], self.cfg.optim.final_lr_fraction)

    def last_lr(self, level: str) -> float:
        """The learning rate of the level's most recent step (its first one before any)."""
        return self.lr(level, max(self.level_steps[level] - 1, 0))

    # ----- shared by the stages -----
    def module(self, level: str) -> torch.nn.Module:
        """What ``level`` trains: E+D, C or T."""
        return {"mae": self.mae, "head": self.head, "mask": self.masknet}[level]

    def _optimizer_step(self, level: str, loss: torch.Tensor) -> float:
        """Average loss, gradients and BatchNorm running statistics over ranks (``sync``), check, step.

        The loss travels with the gradients, so every rank sees a NaN or inf on
        any rank and all of them stop at the same step, before a bad update.
        Running statistics (C's) are averaged so that replicas stay identical
        in every tensor, not only in their parameters.
        """
        module = self.module(level)
        loss = loss.detach().float().reshape(1).clone()
        stats = [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 for b in (m.running_mean, m.running_var) if b is not None]
        self.sync([loss] + [p.grad for p in module.parameters() if p.grad is not None] + stats)
        value = float(loss)
        if not math.isfinite(value):
            # iterations count from 1, as the progress lines do: this is the one being computed
            raise NonFiniteLossError(f"non-finite {LEVEL_NAMES[level]} loss ({value}) at iteration "
                                     f"{self.iteration + 1}")
        set_lr(self.optimizers[level], self.lr(level))
        self.optimizers[level].step()
        self.level_steps[level] += 1
        return value

    def _shared_features(self, stage2_batch: Batch, stage3_batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One encoder pass (with its graph) over a Stage-II and a Stage-III batch."""
        with self._autocast():
            both = self.mae.forward_features(torch.cat([stage2_batch[0], stage3_batch[0]]))
        n = len(stage2_batch[0])
        return both[:n], both[n:]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.run.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----- checkpointable state -----
    def head_queue_state(self) -> list[list[torch.Tensor]]:
        """This rank's kept Stage-II features (``head_reuse``) as plain CPU tensors: each rank keeps its own
        batches', so a data-parallel checkpoint holds every rank's (see ``state_dict``)."""
        return [[f.cpu(), y.cpu()] for f, y in self.head_queue]

    def state_dict(self, head_queues: list[list[list[torch.Tensor]]] | None = None) -> dict[str, Any]:
        """Everything needed to continue bit for bit: plain tensors and containers only. ``head_queues``:
        every rank's ``head_queue_state()`` in rank order (gathered by the caller under data
        parallelism); by default this engine's alone."""
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": STATE_FORMAT,
            "config": self.cfg.to_dict(),
            "num_classes": self.num_classes,
            "total_steps": self.total_steps,
            "iteration": self.iteration,
            "level_steps": dict(self.level_steps),
            "modules": {"mae": self.mae.state_dict(), "head": self.head.state_dict(),
                        "masknet": self.masknet.state_dict()},
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "rng": rng,
            "head_queues": head_queues if head_queues is not None else [self.head_queue_state()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')} is not {STATE_FORMAT}")
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"checkpoint has {state['num_classes']} classes, this engine {self.num_classes}")
        self.mae.load_state_dict(state["modules"]["mae"])
        self.head.load_state_dict(state["modules"]["head"])
        self.masknet.load_state_dict(state["modules"]["masknet"])
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        self.total_steps = int(state["total_steps"])
        self.iteration = int(state["iteration"])
        self.level_steps = {k: int(v) for k, v in state["level_steps"].items()}
        queues = state.get("head_queues", [])
        self.head_queue = [(f.to(self.device), y.to(self.device)) for f, y in
                           (queues[self.rank] if self.rank < len(queues) else [])]
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device | str = "cpu",
                        sync: Sync = no_sync) -> MLOEngine:
        """A fresh engine with the saved config, then the saved state."""
        engine = cls(from_dict(state["config"]), state["num_classes"], state["total_steps"], device, sync)
        engine.load_state_dict(state)
        return engine

"""What each Ray Train worker runs: the engine, data-parallel, fed by its plan of the three level streams.

Every rank trains on its own rows and averages with the others through
``mlo_mae.distributed.allreduce_mean`` (see ``MLOEngine._optimizer_step`` and
``hypergradient.hyper_direction`` for what is averaged and why). Ray Train's
protocol: ``get_checkpoint()`` on start, ``report(metrics, checkpoint)`` from
every rank at the same steps, the checkpoint written by rank 0 only. Rank 0
alone prints progress (through a queue to the driver) and runs the final probe.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import ray.train
import ray.util
import torch

from mlo_mae import config as config_mod
from mlo_mae.config import total_iterations
from mlo_mae.distributed import allreduce_mean, gather_objects, module_digest, no_sync
from mlo_mae.engine import MLOEngine, NonFiniteLossError, resolve_device
from mlo_mae.loop import due, fit, format_progress
from pipelines.manifest import PreparedDataset, load_prepared
from pipelines.plan import RankPlan, list_chunks
from pipelines.ray_data import LevelStream, configure_data_context
from pipelines.streams import LEVELS, Normalizer, level_specs, normalized

from . import checkpoints
from .downstream import probe_encoder
from .recording import Recorder
from .tracking import RunLogger


class ResumeError(RuntimeError):
    """A checkpoint that this run cannot continue from (the message says why)."""


def batch_size(cfg: config_mod.Config, level: str) -> int:
    """Per worker; the global batch is this times the number of workers."""
    return getattr(cfg.data, f"batch_{level}")


def window_rows(batch: int) -> int:
    """Rows shuffled together in a stream: a few batches' worth (memory: 3 levels x this x image)."""
    return max(4 * batch, 512)


def data_position(engine: MLOEngine, cfg: config_mod.Config, world: int) -> dict[str, Any]:
    """Where each level's stream stands: batches drawn (the same on every rank) and the plan's shape."""
    return {"world_size": world, "seed": cfg.run.seed,
            "levels": {level: {"batches": engine.batches_drawn(level), "batch_size": batch_size(cfg, level)}
                       for level in LEVELS}}


def evaluation_line(ev) -> str:
    """What an evaluation found, on one line: C's accuracy and whether the masks still differ by image."""
    line = (f"evaluation at step {ev.step}: D_val sample of {len(ev.snapshot.labels)} images, "
            f"C top-1 {100 * ev.val_top1:.1f}% "
            f"(precise BN), loss {ev.val_loss:.4f}")
    if ev.jaccard is not None:
        line += f" | mask Jaccard {ev.jaccard:.2f} (random {ev.random_jaccard:.2f})"
    if ev.saturated is not None:
        line += f", saturated {100 * ev.saturated:.0f}%, mean p masked {ev.mean_prob_masked:.2f}"
    if ev.object_masked is not None:
        line += f" | object masked {ev.object_masked:.2f} (random {ev.object_masked_random:.2f})"
    if ev.recon_vs_random is not None:
        line += f", error vs random masks {ev.recon_vs_random:.2f}"
    return line


def placement_line(nodes: list[str]) -> str:
    """Which Ray node each rank runs on (node ids shortened as ``ray status`` and the dashboard do)."""
    where = ", ".join(f"rank {rank} on {node[:8]}" for rank, node in enumerate(nodes))
    return f"{len(nodes)} worker(s) on {len(set(nodes))} node(s): {where}"


def _restore(engine: MLOEngine, cfg: config_mod.Config, world: int, run_dir: str) -> dict[str, Any] | None:
    """Load the run's latest checkpoint into ``engine``, if there is one; check it fits this run.
    Returns the whole saved state (the recorder's part too), None when starting afresh."""
    checkpoint = checkpoints.latest(run_dir)
    if checkpoint is None:
        return None
    state = checkpoints.load(checkpoint)
    saved = state["data"]
    if saved["world_size"] != world:
        raise ResumeError(f"the checkpoint was written by {saved['world_size']} workers; resume with "
                          f"--workers {saved['world_size']} (the data plan depends on it)")
    if config_mod.from_dict(state["engine"]["config"]).to_dict() != cfg.to_dict():  # older: fewer keys
        raise ResumeError("the checkpoint's config differs from this run's")
    engine.load_state_dict(state["engine"])
    return state


def _streams(engine: MLOEngine, data: PreparedDataset, cfg: config_mod.Config, rank: int, world: int):
    """Each level's rank-local stream, from the batch the engine reached to the last one the run needs."""
    specs = level_specs(data, cfg.model.img_size, cfg.data.augment, cfg.run.seed, cfg.data.augment_head)
    streams = {}
    for level in LEVELS:
        if not engine.batches_per_iteration(level):
            continue  # plain MAE, or a T that does not learn: no Stage III
        spec, batch = specs[level], batch_size(cfg, level)
        plan = RankPlan(list_chunks(data.files(spec.split), world), spec.seed, rank, world, window_rows(batch))
        streams[level] = LevelStream(plan, spec, batch, engine.batches_drawn(level),
                                     engine.total_steps * engine.batches_per_iteration(level))
    return streams


def _inject_nan(spec: str | None, streams: dict, rank: int, first: dict[str, int]) -> None:
    """Fault injection for tests: ``level:batch:rank`` turns that batch's images into NaN."""
    if not spec:
        return
    level, index, target = spec.split(":")
    if int(target) != rank or level not in streams:
        return

    def poisoned(stream, drawn):
        for images, labels in stream:
            yield (torch.full_like(images, float("nan")) if drawn == int(index) else images), labels
            drawn += 1

    streams[level] = poisoned(streams[level], first[level])


def train_loop_per_worker(params: dict[str, Any]) -> None:
    cfg = config_mod.from_dict(params["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    sharing = context.get_local_world_size() * params.get("concurrent", 1)  # processes training on this node
    torch.set_num_threads(cfg.run.threads or max(1, (os.cpu_count() or 1) // sharing))
    device = ray.train.torch.get_device() if resolve_device(cfg.run.device).type == "cuda" else torch.device("cpu")
    progress = params.get("progress")

    def say(kind: str, text: Any) -> None:
        if rank == 0 and progress is not None:
            progress.put((kind, text))

    configure_data_context()
    data = load_prepared(params["dataset_path"])
    engine = MLOEngine(cfg, data.num_classes, total_iterations(cfg, data.count("train")), device,
                       sync=allreduce_mean if world > 1 else no_sync, rank=rank, world_size=world)
    try:
        restored = _restore(engine, cfg, world, params["run_dir"])
    except ResumeError as err:  # deterministic: ending normally keeps Ray Train from retrying it
        say("error", f"cannot resume: {err}")
        return
    norm = Normalizer(data.mean, data.std, device)
    recorder = None
    if rank == 0:  # metrics, evaluations and heatmaps come from rank 0 only
        tracking = params.get("tracking")
        logger = RunLogger(tracking["uri"], tracking["run_id"], lambda text: say("log", text)) if tracking else None
        recorder = Recorder(logger, engine, data, cfg, norm, lambda text: say("log", text))
        if restored is not None:
            recorder.load_state_dict(restored.get("recorder", {}))
    if restored is not None:
        say("log", f"resumed from the checkpoint at iteration {engine.iteration}/{engine.total_steps}")
    nodes = gather_objects(ray.get_runtime_context().get_node_id())
    say("log", placement_line(nodes))
    if recorder is not None:
        recorder.placement(nodes)
    if recorder is not None and not recorder.latest():
        recorder.evaluate()  # step 0 (the masks before any training), or a checkpoint saved without the numbers
    raw = _streams(engine, data, cfg, rank, world)
    streams = {level: normalized(stream, norm) for level, stream in raw.items()}
    _inject_nan(params.get("inject_nan"), streams, rank, {level: engine.batches_drawn(level) for level in LEVELS})
    images_per_iteration = cfg.data.batch_mae * cfg.mlo.unroll_mae * world
    first_step = engine.iteration + 1
    saved = {"iteration": engine.iteration if restored is not None else None}

    group = ray.util.get_current_placement_group()
    placement = {"placement_group": group.id.hex()} if group is not None and rank == 0 else {}

    def reported(metrics: dict[str, Any]) -> dict[str, Any]:
        """Rank 0's reports carry the last evaluation, so that a Tune scheduler sees its metric in every one,
        and the workers' placement group, which a study removes if Tune stops the trial (see training.study)."""
        return {"iteration": engine.iteration, **(recorder.latest() if recorder is not None else {}), **placement,
                **metrics}

    def report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        """Every rank reports at the same steps; rank 0 attaches the checkpoint (Ray Train's protocol)."""
        if not with_checkpoint:
            ray.train.report(reported(metrics))
            return
        saved["iteration"] = engine.iteration
        head_queues = gather_objects(engine.head_queue_state())  # every rank's kept Stage-II features
        with tempfile.TemporaryDirectory(prefix="mlo-mae-ckpt-") as folder:
            if rank == 0:
                checkpoints.write(folder, {"engine": engine.state_dict(head_queues),
                                           "data": data_position(engine, cfg, world),
                                           "recorder": recorder.state_dict()})
            ray.train.report(reported(metrics),
                             checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)

    def on_step(stats, prog) -> None:
        done, total, r = prog.step, prog.total, cfg.run
        images_per_s = images_per_iteration * prog.steps_per_s
        wait = sum(s.wait_s for s in raw.values()) / max(prog.elapsed_s, 1e-9)
        if recorder is not None:
            recorder.step(stats, images_per_s, wait)
        metrics: dict[str, Any] = {}
        if due(done, r.log_every, total) or done == first_step:
            say("log", format_progress(stats, prog) + f" | {images_per_s:.0f} img/s | data wait {100 * wait:.0f}%")
            metrics.update(loss_mae=stats.loss_mae, loss_head=stats.loss_head,
                           **({"loss_val": stats.loss_val} if stats.loss_val is not None else {}))
            if recorder is not None:
                recorder.flush()
        if due(done, r.eval_every, total):
            metrics["evaluated"] = True  # rank 0 adds the numbers; every rank reports at this step
            if recorder is not None:
                ev = recorder.evaluate()
                say("log", evaluation_line(ev))
        checkpoint_now = r.checkpoint_every > 0 and done % r.checkpoint_every == 0 and done < total
        if metrics or checkpoint_now:
            report(metrics, checkpoint_now)  # the final checkpoint follows, with the final metrics

    start = time.perf_counter()
    try:
        fit(engine, streams, on_step)
    except NonFiniteLossError as err:
        # Every rank raises at the same step (the loss is averaged with the gradients). Ending
        # normally, not by an exception, keeps Ray Train from retrying a run that would diverge again.
        kept = (f"the last good checkpoint (iteration {saved['iteration']}) is kept" if saved["iteration"] is not None
                else "no checkpoint had been written yet")
        say("error", f"training stopped: {err}; {kept}")
        ray.train.report(reported({"stopped": str(err)}))
        return
    finally:
        for stream in raw.values():
            stream.close()
        if recorder is not None:
            recorder.flush()
    digests = gather_objects({"mae": module_digest(engine.mae), "head": module_digest(engine.head),
                              "masknet": module_digest(engine.masknet)})
    metrics: dict[str, Any] = {"train_seconds": time.perf_counter() - start,
                               "replica_digests": digests, "replicas_identical": all(d == digests[0] for d in digests)}
    if rank == 0 and not metrics["replicas_identical"]:
        say("log", f"warning: the {world} replicas ended with different parameters: {digests}")
    report(metrics, True)
    if recorder is not None:
        probe = None
        if cfg.run.probe:
            probe = probe_encoder(engine.mae, data, cfg, device)
            metrics.update(probe_val_top1=probe.val_top1, probe_test_top1=probe.test_top1)
            for result in (probe, *probe.others.values()):
                say("log", f"linear probe of {result.features} features (frozen encoder, L2 {result.weight_decay:g} "
                           f"chosen on D_val): D_val top-1 {100 * result.val_top1:.1f}% | test top-1 "
                           f"{100 * result.test_top1:.1f}%")
        recorder.finish(metrics, probe)
    say("metrics", reported(metrics))
    ray.train.report(reported(metrics))

"""The driver side of ``mlo-mae pretrain``: start or join Ray, run the TorchTrainer, relay progress.

A run lives in ``STORAGE/NAME`` (see ``training.storage``). Running a TorchTrainer again
with the same storage path and name is how Ray Train V2 resumes; ``--resume``
does exactly that with the saved settings.

Worker output is not forwarded line by line (Ray's own actors are chatty);
rank 0 sends its progress through a small queue actor and the driver prints it.
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mlo_mae import config as config_mod
from mlo_mae.errors import Interrupted, RunFailed
from pipelines.location import is_uri, storage_env
from pipelines.manifest import PreparedDataset

from .signals import last_signal, sigterm_as_sigint
from .storage import storage_uri


class TrainingError(RunFailed):
    """Training stopped; the message is one line for the user (details in Ray's logs)."""


class TrainingInterrupted(Interrupted):
    """The user stopped the run (Ctrl-C, SIGTERM); its checkpoints are kept for ``--resume``."""

    def __init__(self, name: str, signum: int) -> None:
        super().__init__(f"run '{name}' interrupted; its checkpoints are kept", signum)
        self.name = name


@dataclass
class Launch:
    """Where and how wide a run goes; not part of the training config (it does not change the maths
    except through ``workers``, which is saved with the run)."""

    name: str
    storage_path: str = "ray_results"
    workers: int = 1
    cpus_per_worker: float | None = None  # None: see resources()
    gpus_per_worker: float | None = None  # None: 1 when the config asks for CUDA (or auto and the cluster has GPUs)
    address: str | None = None  # None: start a local cluster sized to this machine
    placement: str = "pack"  # pack: fewest nodes; spread: one worker a node where it can (both best effort)
    concurrent: int = 1  # runs training at once on the cluster (a study's trials): they split CPUs and threads
    reserved_cpus: float = 0.0  # CPUs that other actors hold (Tune's trial drivers), not for workers or data


def init_ray(address: str | None = None) -> None:
    """Join the cluster at ``address`` (else at $RAY_ADDRESS) or start a local one sized to this machine."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only cluster
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers on a running cluster do not inherit this shell's object-store settings: the job carries them.
    env = storage_env()
    job = {"runtime_env": {"env_vars": env}} if env else {}
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR", **job)
    else:
        ray.init(num_cpus=os.cpu_count(), log_to_driver=False, logging_level="ERROR", include_dashboard=False, **job)


def connect(address: str | None) -> None:
    """``init_ray``, with a failure as one ``TrainingError`` line."""
    try:
        init_ray(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise TrainingError(f"cannot start or reach Ray ({address or 'local'}): {last_error_line(err)}") from None


def last_error_line(err: BaseException | str) -> str:
    """The innermost 'SomeError: message' line of a worker's traceback, else the exception itself."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    found = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    return (found[-1] if found else " ".join(str(err).split()))[:300]


# Ray Train's controller polls its workers every 2 s by default, and a run's end and every checkpoint report
# wait for a poll: about 5 s of an idle machine per run on 2 cores. A poll is a few small RPCs.
HEALTH_CHECK_INTERVAL_S = "0.5"


def poll_workers_often() -> None:
    """Ray Train's controller polls every ``HEALTH_CHECK_INTERVAL_S`` unless the user set the interval."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)


DATA_CPUS = 1.0  # left free per concurrent run for Ray Data's read and decode tasks (each takes a whole CPU)


def worker_resources(cfg: config_mod.Config, launch: Launch, cluster: dict[str, float]) -> dict[str, float]:
    """What Ray reserves for each worker of a run on ``cluster`` (``ray.cluster_resources()``).

    CPU training: the workers of the ``launch.concurrent`` runs share the CPUs but one per run, which
    Ray Data needs (without it a small machine deadlocks), and but ``launch.reserved_cpus``.
    GPU training: a GPU and a CPU a worker; the other CPUs decode.
    """
    gpus = launch.gpus_per_worker
    if gpus is None:
        wants_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and cluster.get("GPU", 0) > 0)
        gpus = 1.0 if wants_cuda else 0.0
    free = cluster.get("CPU", 1) - DATA_CPUS * launch.concurrent - launch.reserved_cpus
    cpus = launch.cpus_per_worker or (1.0 if gpus > 0 else max(0.5, free / (launch.workers * launch.concurrent)))
    return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}


def resources(cfg: config_mod.Config, launch: Launch) -> tuple[bool, dict[str, float]]:
    """(use_gpu, resources per worker) for the cluster Ray is connected to."""
    import ray

    per_worker = worker_resources(cfg, launch, ray.cluster_resources())
    return "GPU" in per_worker, per_worker


def warn_local_store(uri: str, warn: Callable[[str], None]) -> None:
    """A sqlite or file store is a file on this machine: workers on other nodes cannot log to it."""
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1 and uri.split(":", 1)[0] in ("sqlite", "file"):
        warn(f"warning: runs log to {uri}, a file on this machine, but the cluster has {nodes} nodes: use a "
             "tracking server (--tracking-uri http://...)")


def batch_problem(cfg: config_mod.Config, data: PreparedDataset, workers: int) -> str | None:
    """Why the batches of ``cfg`` cannot be drawn from ``data`` by ``workers`` workers, or None."""
    from pipelines.streams import LEVELS

    from .worker import batch_size

    for level, (split, _) in LEVELS.items():
        batch = batch_size(cfg, level)
        if batch * workers > data.count(split):
            return (f"data.batch_{level} ({batch}) x {workers} worker(s) is larger than the {split} split "
                    f"({data.count(split)} images) of '{data.root}'")
    return None


def run_params(cfg: config_mod.Config, data: PreparedDataset, workers: int) -> dict[str, Any]:
    """What an MLflow pretrain run records beside its config: the data set and the run's shape."""
    from mlo_mae.config import total_iterations

    return {"dataset.name": data.manifest["name"], "dataset.path": data.root,
            "dataset.classes": data.num_classes, "dataset.train_images": data.count("train"),
            "dataset.val_images": data.count("val"), "dataset.test_images": data.count("test"),
            "workers": workers, "global_batch": workers * cfg.data.batch_mae,
            "total_iterations": total_iterations(cfg, data.count("train"))}


def on_this_node():
    """Schedule an actor on the driver's node: it lives and dies with the driver, not with a worker node
    (the progress queue on a lost node would end the run's output, though training goes on)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def fit(trainer, outcome: dict[str, Any]) -> None:
    """``trainer.fit()`` into ``outcome`` ("result" or "error"), for a thread: the main thread relays progress."""
    try:
        outcome["result"] = trainer.fit()
    except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
        outcome["error"] = err


def cluster_line(per_worker: dict[str, float], launch: Launch) -> str:
    """The cluster a run joined and what each worker reserves on it."""
    import ray

    total = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    gpus = f", {total['GPU']:g} GPU(s)" if total.get("GPU") else ""
    reserve = " + ".join(f"{v:g} {k}" for k, v in per_worker.items())
    return (f"Ray: {nodes} node(s), {total.get('CPU', 0):g} CPU(s){gpus}; each of {launch.workers} worker(s) "
            f"reserves {reserve}, placement {launch.placement}")


def run_pretrain(cfg: config_mod.Config, data: PreparedDataset, launch: Launch,
                 echo: Callable[[str], None], tracking: dict[str, str] | None = None,
                 callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train to the end (or continue run ``launch.name``); returns rank 0's final metrics and checkpoint.
    ``tracking``: {"uri", "run_id"} of the MLflow run that rank 0 logs to; ``callbacks``: Ray Train
    callbacks (a Tune trial passes ``TuneReportCallback``)."""
    import ray
    import ray.exceptions
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    from .worker import train_loop_per_worker

    outcome: dict[str, Any] = {}
    thread, failure, metrics = None, None, {}
    connect(launch.address)  # first: joining Ray installs Ray's own SIGTERM handler, which aborts
    poll_workers_often()
    with sigterm_as_sigint() as received:  # a Tune trial runs this in a thread: Tune stops trials itself
        try:
            if tracking:
                warn_local_store(tracking["uri"], lambda text: print(text, file=sys.stderr))
            use_gpu, per_worker = resources(cfg, launch)
            echo(cluster_line(per_worker, launch))
            progress = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": on_this_node()})
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"config": cfg.to_dict(), "dataset_path": data.root,
                                   "progress": progress, "run_dir": f"{storage_uri(launch.storage_path)}/{launch.name}",
                                   # fault injection for tests: level:batch:rank gets NaN images
                                   "inject_nan": os.environ.get("MLO_MAE_INJECT_NAN"), "tracking": tracking,
                                   "concurrent": launch.concurrent},
                scaling_config=ray.train.ScalingConfig(num_workers=launch.workers, use_gpu=use_gpu,
                                                       resources_per_worker=per_worker,
                                                       placement_strategy=launch.placement.upper()),
                run_config=ray.train.RunConfig(
                    name=launch.name, storage_path=storage_uri(launch.storage_path),
                    checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                    failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
                    callbacks=list(callbacks)),
            )
            thread = threading.Thread(target=fit, args=(trainer, outcome), name="ray-train-fit", daemon=True)
            thread.start()
            while thread.is_alive() or not progress.empty():
                try:
                    kind, text = progress.get(timeout=0.5)
                except (Empty, queue.Empty):
                    continue
                except ray.exceptions.RayError as err:  # the queue actor, or the whole cluster, is gone
                    raise TrainingError(f"lost the Ray cluster during training: {last_error_line(err)}; the "
                                        "checkpoints are kept (--resume)") from None
                if kind == "error":
                    failure = text
                elif kind == "metrics":
                    metrics = text
                else:
                    echo(text)
        except KeyboardInterrupt:
            ray.shutdown()  # stops the controller and the workers; the checkpoints stay in storage
            if thread is not None:
                thread.join(timeout=60)  # fit() fails fast once disconnected; exiting under it can crash
            raise TrainingInterrupted(launch.name, last_signal(received)) from None
    thread.join()
    if "error" in outcome:
        raise TrainingError(failure or f"training failed: {last_error_line(outcome['error'])} "
                                       "(full traceback in the Ray logs, /tmp/ray/session_latest/logs)")
    if failure:
        raise TrainingError(failure)
    result = outcome["result"]
    if result.checkpoint is not None:  # a URI again when the storage is one (Ray gives the path inside it)
        storage = storage_uri(launch.storage_path)
        scheme = f"{storage.split('://', 1)[0]}://" if is_uri(storage) else ""
        metrics["checkpoint"] = scheme + result.checkpoint.path
    return metrics

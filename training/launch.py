"""The driver side of ``mlo-mae pretrain``: start or join Ray, build the level datasets, run the TorchTrainer.

Worker output is not forwarded line by line (Ray's own actors are chatty);
rank 0 sends its progress through a small queue actor and the driver prints it.
"""

from __future__ import annotations

import os
import queue
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlo_mae import config as config_mod
from pipelines.manifest import PreparedDataset
from pipelines.streams import LEVELS, level_specs


class TrainingError(RuntimeError):
    """Training stopped; the message is one line for the user (details in Ray's logs)."""


def init_ray() -> None:
    """A local cluster sized to this machine (joining an existing one comes with --address)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only cluster
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), log_to_driver=False, logging_level="ERROR",
                 include_dashboard=False)


def _last_error_line(err: BaseException) -> str:
    """The innermost 'SomeError: message' line of a worker's traceback, else the exception itself."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    found = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    return (found[-1] if found else " ".join(str(err).split()))[:300]


def _threads(cfg: config_mod.Config, workers: int) -> int:
    return cfg.run.threads or max(1, (os.cpu_count() or 1) // workers)


def run_pretrain(cfg: config_mod.Config, data: PreparedDataset, storage_path: Path, name: str,
                 echo: Callable[[str], None], workers: int = 1) -> dict[str, Any]:
    """Train to the end; returns the final metrics that rank 0 reported."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    from pipelines.ray_data import configure_data_context, level_dataset

    from .worker import train_loop_per_worker

    init_ray()
    configure_data_context()
    specs = level_specs(data, cfg.model.img_size, cfg.data.augment, cfg.run.seed)
    datasets = {level: level_dataset(data, specs[level]) for level in LEVELS}
    use_gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    # A worker takes less than a whole CPU: Ray Data's read and decode tasks need CPUs of their own,
    # or a small machine deadlocks (the workers would hold every CPU).
    cpus = max(0.5, (ray.cluster_resources().get("CPU", 1) - 1) / workers)
    progress = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "dataset_path": str(data.root.resolve()),
                           "threads": _threads(cfg, workers), "progress": progress,
                           "output": str(Path(cfg.run.output).resolve()) if cfg.run.output else None},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage_path.resolve())),
        datasets=datasets,
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    failure, metrics = None, {}
    while thread.is_alive() or not progress.empty():
        try:
            kind, text = progress.get(timeout=0.5)
        except (Empty, queue.Empty):
            continue
        if kind == "error":
            failure = text
        elif kind == "metrics":
            metrics = text
        else:
            echo(text)
    thread.join()
    if "error" in outcome:
        raise TrainingError(failure or f"training failed: {_last_error_line(outcome['error'])} "
                                       "(full traceback in the Ray logs, /tmp/ray/session_latest/logs)")
    return metrics

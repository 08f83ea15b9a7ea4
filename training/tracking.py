"""MLflow: where runs are recorded and what each one records.

The driver creates the run (params, tags, config) so that it exists, with its
id printed, before any worker starts; rank 0 of the workers then logs metrics,
heatmaps and the exported encoder to that run id. ``probe`` and ``finetune``
log child runs of the pretrain run (``mlflow.parentRunId``) and copy their
headline numbers onto it, so that one row of ``mlo-mae runs`` (or of the MLflow
UI's table) shows a pretrain run with its downstream results.

Tracking URI: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<working folder>/mlflow.db`` (artifacts in ``./mlruns``), which
``mlflow ui --backend-store-uri sqlite:///mlflow.db`` opens.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "mlo-mae"
DEFAULT_DB = "mlflow.db"
KIND_TAG = "mlo_mae.kind"  # pretrain | probe | finetune
MODE_TAG = "mlo_mae.mode"  # mlo | baseline
RUN_DIR_TAG = "mlo_mae.run_dir"  # STORAGE/NAME of the pretrain run's Ray checkpoints
CHECKPOINT_TAG = "mlo_mae.checkpoint"  # the final checkpoint folder
PARENT_TAG = "mlflow.parentRunId"
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used; one line for the user."""


def tracking_uri(flag: str | None = None) -> str:
    """``flag``, else ``$MLFLOW_TRACKING_URI``, else the local sqlite store in the working folder."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path(DEFAULT_DB).resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative: Ray actors run elsewhere
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def client(uri: str):
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not "Creating initial MLflow database tables..."
    return mlflow.MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str, create: bool = True) -> str | None:
    """The id of experiment ``name``; created when missing (and ``create``)."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return mlflow_client.create_experiment(name) if create else None


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{'model': {'depth': 4}}`` -> ``{'model.depth': '4'}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def git_commit() -> str | None:
    """The commit of the source tree this package runs from, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                             check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    out = {}
    for package in ("mlo-mae", "torch", "timm", "ray", "mlflow", "pyarrow"):
        try:
            out[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def standard_tags(kind: str, cfg) -> dict[str, str]:
    tags = {KIND_TAG: kind, MODE_TAG: "baseline" if cfg.mlo.baseline else "mlo", "mlo_mae.preset": cfg.preset,
            **versions()}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def call(what: str, uri: str, action: Callable[[], Any]) -> Any:
    """Run an MLflow call; a failure becomes one line naming the store."""
    from mlflow.exceptions import MlflowException

    try:
        return action()
    except (MlflowException, OSError, ValueError) as err:
        message = " ".join(str(err).split())[:300]
        raise TrackingError(f"MLflow ({uri}): {what} failed: {message}") from None


def start_run(uri: str, experiment: str, name: str, kind: str, cfg, params: Mapping[str, Any],
              tags: Mapping[str, str] | None = None, parent: str | None = None) -> str:
    """Create a run with params and tags; returns its id. Params: the flattened config plus ``params``."""

    def create() -> str:
        from mlflow.entities import Param, RunTag

        mlflow_client = client(uri)
        exp = experiment_id(mlflow_client, experiment)
        all_tags = {**standard_tags(kind, cfg), **(tags or {}), **({PARENT_TAG: parent} if parent else {})}
        run = mlflow_client.create_run(exp, run_name=name, tags=all_tags)
        flat = {**flatten(cfg.to_dict()), **{k: str(v) for k, v in params.items()}}
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            mlflow_client.log_batch(run.info.run_id, params=items[i: i + 100],
                                    tags=[RunTag("mlflow.runName", name)] if i == 0 else [])
        mlflow_client.log_text(run.info.run_id, cfg.to_yaml(), "config.yaml")
        return run.info.run_id

    return call("creating a run", uri, create)


def end_run(uri: str, run_id: str, status: str, warn: Callable[[str], None] | None = None) -> None:
    """FINISHED, FAILED or KILLED. With ``warn``, a failure is a warning: the work itself is done."""
    try:
        call("ending the run", uri, lambda: client(uri).set_terminated(run_id, status))
    except TrackingError as err:
        if warn is None:
            raise
        warn(f"warning: {err}")


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a resumed run as running again."""
    call("reopening the run", uri, lambda: client(uri).update_run(run_id, status="RUNNING"))


class RunLogger:
    """Rank 0's view of one run: buffered metrics, images by step, artifacts.

    A failing tracking server must not end hours of training: the first failure
    is reported through ``warn`` and the run goes on without logging.
    """

    def __init__(self, uri: str, run_id: str, warn: Callable[[str], None]) -> None:
        self.uri, self.run_id, self.warn = uri, run_id, warn
        self.pending: list = []
        self.failed = False
        self.client = None
        self.guarded("connecting", lambda: setattr(self, "client", client(uri)))

    def guarded(self, what: str, action: Callable[[], Any]) -> None:
        """Run ``action`` unless logging already failed; a failure is reported once, not raised."""
        if self.failed:
            return
        try:
            action()
        except Exception as err:  # noqa: BLE001 - any tracking failure, reported once
            self.failed = True
            self.warn(f"warning: MLflow logging stopped ({what}: {' '.join(str(err).split())[:200]}); "
                      "training goes on")

    def metrics(self, values: Mapping[str, float | None], step: int) -> None:
        """Buffer one step's metrics (None values are skipped); sent by ``flush``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]

    def flush(self) -> None:
        pending, self.pending = self.pending, []

        def send() -> None:
            for i in range(0, len(pending), MAX_BATCH):
                self.client.log_batch(self.run_id, metrics=pending[i: i + MAX_BATCH])

        if pending:
            self.guarded("metrics", send)

    def artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.guarded(local_dir, lambda: self.client.log_artifacts(self.run_id, local_dir, artifact_path))



def record_checkpoint(uri: str, run_id: str, checkpoint: str, run_dir: str, name: str) -> None:
    """Where the run's Ray checkpoint is (a tag, and ``checkpoint.json`` for the artifact view)."""
    import json

    def record() -> None:
        mlflow_client = client(uri)
        mlflow_client.set_tag(run_id, CHECKPOINT_TAG, checkpoint)
        storage = run_dir.rsplit("/", 1)[0]
        pointer = {"checkpoint": checkpoint, "run_dir": run_dir,
                   "resume": f"mlo-mae pretrain --resume {name} --storage-path {storage}",
                   "evaluate": f"mlo-mae probe {run_id} | mlo-mae finetune {run_id}"}
        mlflow_client.log_text(run_id, json.dumps(pointer, indent=2) + "\n", "checkpoint.json")

    call("recording the checkpoint", uri, record)

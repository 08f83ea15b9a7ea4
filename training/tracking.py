"""MLflow: where runs are recorded and what each one records.

The driver creates the run (params, tags, config) so that it exists, with its
id printed, before any worker starts; rank 0 of the workers then logs metrics,
heatmaps and the exported encoder to that run id. ``probe`` and ``finetune``
log child runs of the pretrain run (``mlflow.parentRunId``) and copy their
headline numbers onto it, so that one row of ``mlo-mae runs`` (or of the MLflow
UI's table) shows a pretrain run with its downstream results.

Tracking URI: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<working folder>/mlflow.db`` (artifacts in ``./mlruns``), which
``mlflow ui --backend-store-uri sqlite:///mlflow.db`` opens. ``check_store``
tries the store in seconds before anything starts; MLflow's own client would
retry an unreachable server for about four minutes.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput

    from pipelines.manifest import PreparedDataset

DEFAULT_EXPERIMENT = "mlo-mae"
DEFAULT_DB = "mlflow.db"
KIND_TAG = "mlo_mae.kind"  # pretrain | probe | finetune
MODE_TAG = "mlo_mae.mode"  # mlo | baseline
RUN_DIR_TAG = "mlo_mae.run_dir"  # STORAGE/NAME of the pretrain run's Ray checkpoints
CHECKPOINT_TAG = "mlo_mae.checkpoint"  # the final checkpoint folder
PARENT_TAG = "mlflow.parentRunId"
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # model training, not GenAI (see ui_link for MLflow 3.17's UI)
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
# MLflow's defaults (7 retries with exponential backoff, 120 s timeout) retry a dead server for ~4 minutes;
# 3 retries wait ~12 s, still enough for a server restart. The user's own settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


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


def check_store(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when the store at ``uri`` cannot be used: MLflow's client would
    retry an unreachable server for minutes and then print a page of urllib3. http(s): the server's
    ``/health`` answers within ``timeout_s``, no retries; sqlite: the database's folder is (or can be
    created in) a writable folder. Other stores are left to MLflow."""
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout_s)
    elif uri.startswith("sqlite:"):
        _check_sqlite(uri)


def _check_server(uri: str, timeout_s: float) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s, context=_tls_context()):
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):  # it is there; credentials are checked by the first real call
            return
        problem, expected = f"/health answered HTTP {err.code}", "is it an MLflow tracking server?"
    except OSError as err:  # URLError, refused, timeouts, DNS and TLS failures
        problem, expected = _network_problem(err, timeout_s), "is `mlflow server` running there?"
    raise TrackingError(f"cannot reach the MLflow tracking server at {uri}: {problem}; {expected}")


def _tls_context() -> ssl.SSLContext | None:
    """The TLS settings MLflow's own client honours, so that the check agrees with it."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # noqa: S323 - the user asked for it
    cafile = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    return ssl.create_default_context(cafile=cafile) if cafile else None


def _network_problem(err: OSError, timeout_s: float) -> str:
    """A few words for why a connection failed (not urllib's nested repr)."""
    reason = getattr(err, "reason", err)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason.strerror})"
    if isinstance(reason, ssl.SSLError):
        return f"TLS error ({reason.reason or reason})"
    return " ".join(str(getattr(reason, "strerror", None) or reason).split())[:120]


def _check_sqlite(uri: str) -> None:
    path = uri[len("sqlite://"):].split("?", 1)[0]
    if path in ("", "/:memory:"):
        return
    db = Path(path[1:])  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db
    if db.is_dir():
        raise TrackingError(f"cannot use the MLflow store {uri}: '{db}' is a folder; expected a database file")
    folder = db.absolute().parent
    while not folder.exists() and folder != folder.parent:  # MLflow creates the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise TrackingError(f"cannot use the MLflow store {uri}: '{folder}' is a file; "
                            "expected a folder for the database")
    if not os.access(folder, os.W_OK | os.X_OK) or (db.exists() and not os.access(db, os.W_OK)):
        raise TrackingError(f"cannot use the MLflow store {uri}: '{db if db.exists() else folder}' is not "
                            "writable; expected a writable database file and folder")


def client(uri: str):
    import logging

    import mlflow

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not "Creating initial MLflow database tables..."
    return mlflow.MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str, create: bool = True) -> str | None:
    """The id of experiment ``name``; created when missing (and ``create``). An experiment we log to
    is marked as model development: MLflow's UIs that go by the kind tag then open it on its runs, not
    on the GenAI (traces) view."""
    found = mlflow_client.get_experiment_by_name(name)
    kind = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    if found is None:
        return mlflow_client.create_experiment(name, tags=kind) if create else None
    if create and EXPERIMENT_KIND_TAG not in found.tags:  # created before the tag, or by someone else
        mlflow_client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


def ui_link(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """A browser link to an experiment (or one of its runs) in MLflow's model-training view. MLflow 3.17's
    UI takes GenAI-or-training from a global switch that defaults to GenAI, not from the experiment's
    kind tag; only the link's ``workflowType`` overrides it (and a redirect would drop it)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    run = f"/runs/{run_id}" if run_id else ""
    return f"{base}/#/experiments/{experiment_id}{run}?workflowType=machine_learning"


def run_link(uri: str, run_id: str) -> str:
    """``ui_link`` of a run known by its id alone."""
    return ui_link(uri, call("finding the run", uri, lambda: client(uri).get_run(run_id).info.experiment_id), run_id)


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


def source_tags(kind: str) -> dict[str, str]:
    """What MLflow's fluent API would set and the run page shows as Source (a client-made run has none)."""
    tags = {"mlflow.source.name": f"mlo-mae {kind}", "mlflow.source.type": "LOCAL"}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (OSError, KeyError):  # no login name in a bare container
        pass
    return tags


def standard_tags(kind: str, cfg) -> dict[str, str]:
    return {KIND_TAG: kind, MODE_TAG: "baseline" if cfg.mlo.baseline else "mlo", "mlo_mae.preset": cfg.preset,
            **versions(), **source_tags(kind)}


def dataset_digest(manifest: Mapping[str, Any]) -> str:
    """A short id of a prepared data set's content: its shards' checksums (not when it was prepared)."""
    shards = sorted(f"{s['file']} {s['sha256']}" for s in manifest["shards"])
    return hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]


def dataset_input(name: str, root: str | os.PathLike, manifest: Mapping[str, Any]) -> DatasetInput:
    """The prepared data set as an MLflow dataset input: the run page's Dataset, with its counts."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = {f"{split}_images": manifest["counts"][split]["total"] for split in ("train", "val", "test")}
    from pipelines.location import is_uri

    root = str(root)
    remote = is_uri(root)
    source_type = root.split("://", 1)[0] if remote else "local"  # MLflow's names: local, s3, gs, ...
    dataset = Dataset(name=name, digest=dataset_digest(manifest), source_type=source_type,
                      source=json.dumps({"uri": root if remote else str(Path(root).resolve())}),
                      profile=json.dumps({**profile, "classes": len(manifest["classes"])}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])


def call(what: str, uri: str, action: Callable[[], Any]) -> Any:
    """Run an MLflow call; a failure becomes one line naming the store."""
    from mlflow.exceptions import MlflowException

    try:
        return action()
    except (MlflowException, OSError, ValueError) as err:
        message = " ".join(str(err).split())[:300]
        raise TrackingError(f"MLflow ({uri}): {what} failed: {message}") from None


def start_run(uri: str, experiment: str, name: str, kind: str, cfg, params: Mapping[str, Any],
              tags: Mapping[str, str] | None = None, parent: str | None = None,
              dataset: PreparedDataset | None = None) -> str:
    """Create a run with params and tags; returns its id. Params: the flattened config plus ``params``;
    ``dataset``: the prepared data set the run trains on, logged as its dataset input."""

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
        if dataset is not None:
            mlflow_client.log_inputs(run.info.run_id, [dataset_input(dataset.manifest["name"], dataset.root,
                                                                     dataset.manifest)])
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

    def tags(self, values: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.guarded("tags", lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in values.items()]))



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

"""One pretrain run from start to end, as ``mlo-mae pretrain`` and a Tune trial both start it.

``pretrain`` checks the batches against the data, creates (or reopens) the
run's MLflow run, saves ``mlo-mae-run.yaml`` for ``--resume``, trains through
Ray Train and records the outcome: the final checkpoint on the MLflow run and
the run's status, which is never left RUNNING. ``new_run`` and ``resume_run``
are the command's two ways in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mlo_mae import config as config_mod
from mlo_mae.errors import InputError, Interrupted
from pipelines.catalog import open_dataset
from pipelines.manifest import PreparedDataset

from . import tracking
from .launch import Launch, TrainingInterrupted, batch_problem, run_params, run_pretrain
from .storage import read_run, resume_hint, storage_uri, write_run

Echo = Callable[[str], None]


@dataclass
class RunTracking:
    """The MLflow run a pretrain run records to (saved with the run, so ``--resume`` logs to it again)."""

    uri: str
    experiment: str = tracking.DEFAULT_EXPERIMENT
    run_id: str | None = None  # None until the run is created

    @classmethod
    def saved(cls, settings: dict[str, Any] | None) -> RunTracking | None:
        return cls(**settings) if settings else None


@dataclass
class RunIdentity:
    """How the MLflow run of a new pretrain run is named and linked (a Tune trial: a child of its study)."""

    name: str | None = None  # None: the run's name
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def device_label(cfg: config_mod.Config, launch: Launch) -> str:
    """Where training runs, for the header: the device found here, or as asked on a remote cluster."""
    if launch.address is not None:
        return cfg.run.device
    from mlo_mae.engine import resolve_device

    try:
        return str(resolve_device(cfg.run.device))
    except ValueError:
        return cfg.run.device


def check_device(cfg: config_mod.Config, launch: Launch) -> None:
    """The device and precision asked for must exist here (on a remote cluster the workers decide)."""
    from mlo_mae.engine import resolve_device

    on_cuda = cfg.run.device == "cuda"
    if launch.address is None:
        try:
            on_cuda = resolve_device(cfg.run.device).type == "cuda"
        except ValueError as err:
            raise InputError(str(err)) from None
    if cfg.run.precision == "bf16" and not on_cuda:
        raise InputError("--precision bf16 needs a CUDA device; use fp32 on CPU (or --device cuda on a GPU cluster)")


def _header(cfg: config_mod.Config, data: PreparedDataset, launch: Launch, resume: bool, echo: Echo) -> None:
    from mlo_mae.config import total_iterations

    total = total_iterations(cfg, data.count("train"))
    echo(f"{config_mod.describe_masking(cfg)} | preset {cfg.preset} | {data.manifest['name']}: "
         f"D_tr {data.count('train')}, "
         f"D_val {data.count('val')}, test {data.count('test')} | {total} iterations (unroll "
         f"{cfg.mlo.unroll_mae}/{cfg.mlo.unroll_head}/{cfg.mlo.unroll_mask}) | device {device_label(cfg, launch)}")
    n, o = launch.workers, cfg.optim
    scale = config_mod.lr_scale(o.lr_scaling, n)
    echo(f"{n} worker(s) | global batch {n * cfg.data.batch_mae} (= {n} x {cfg.data.batch_mae} per worker) | "
         f"lr scaling '{o.lr_scaling}' x{scale:g}: lr_mae {o.lr_mae * scale:.3g}, lr_head "
         f"{o.lr_head * scale:.3g}, lr_mask {o.lr_mask * scale:.3g}")
    echo(f"run '{launch.name}' in {storage_uri(launch.storage_path)}"
         + (" (resuming from its last checkpoint)" if resume else ""))


def _open_tracking(run: RunTracking, cfg: config_mod.Config, data: PreparedDataset, launch: Launch,
                   identity: RunIdentity, resume: bool) -> None:
    """Create the MLflow run (or reopen it on resume); a store that cannot be used is the user's to fix."""
    run_dir = f"{storage_uri(launch.storage_path)}/{launch.name}"
    try:
        tracking.check_store(run.uri)
        if resume:
            tracking.reopen_run(run.uri, run.run_id)
            return
        run.run_id = tracking.start_run(run.uri, run.experiment, identity.name or launch.name, "pretrain", cfg,
                                        run_params(cfg, data, launch.workers),
                                        {tracking.RUN_DIR_TAG: run_dir, **identity.tags},
                                        parent=identity.parent_run_id, dataset=data)
    except tracking.TrackingError as err:
        raise InputError(f"--tracking-uri: {err}") from None


def pretrain(cfg: config_mod.Config, launch: Launch, run: RunTracking | None, echo: Echo, warn: Echo, *,
             resume: bool = False, data: PreparedDataset | None = None, identity: RunIdentity | None = None,
             callbacks: Sequence[Any] = (), end_run: bool = True) -> dict[str, Any]:
    """Train run ``launch.name`` to its end (or on from its last checkpoint when ``resume``); returns rank 0's
    final metrics (with ``checkpoint``). ``end_run``: set the MLflow run's status at the end (a Tune trial
    leaves that to the study, which alone knows whether Tune stopped it)."""
    data = data or open_dataset(cfg.data.dataset, echo)
    problem = batch_problem(cfg, data, launch.workers)
    if problem:
        raise InputError(problem)
    _header(cfg, data, launch, resume, echo)
    if run is not None:
        _open_tracking(run, cfg, data, launch, identity or RunIdentity(), resume)
        echo(f"MLflow run {run.run_id} (experiment '{run.experiment}') at {run.uri}")
    if not resume:
        write_run(launch.storage_path, launch.name, {"config": cfg.to_dict(), "dataset": data.root,
                                                    "workers": launch.workers,
                                                    "mlflow": asdict(run) if run is not None else None})

    def end(status: str) -> None:  # the training's outcome stands even if the tracking store is gone
        if run is not None and end_run:
            tracking.end_run(run.uri, run.run_id, status, warn)

    logged = {"uri": run.uri, "run_id": run.run_id} if run is not None else None
    try:
        metrics = run_pretrain(cfg, data, launch, echo, logged, callbacks)
    except TrainingInterrupted as stop:
        end("KILLED")
        hint = resume_hint("pretrain", launch.name, launch.storage_path)
        raise Interrupted(f"interrupted; the checkpoints are kept: {hint}", stop.signum) from None
    except BaseException:
        end("FAILED")  # a TrainingError, or an unexpected one: the MLflow run must not stay RUNNING
        raise
    _report(metrics, echo)
    if run is not None:
        if "checkpoint" in metrics:
            try:
                tracking.record_checkpoint(run.uri, run.run_id, metrics["checkpoint"],
                                           f"{storage_uri(launch.storage_path)}/{launch.name}", launch.name)
            except tracking.TrackingError as err:
                warn(f"warning: {err}")
        end("FINISHED")
        echo(logged_line(run.uri, run.run_id))
    return metrics


def logged_line(uri: str, run_id: str) -> str:
    """Where a finished run is in MLflow: its page in the UI's model-training view (not its GenAI view),
    and for a local store the command that serves it."""
    try:
        link = tracking.run_link(uri, run_id)
    except tracking.TrackingError:
        link = None
    serve = f" after 'mlflow ui --backend-store-uri {uri}'" if uri.startswith("sqlite") else ""
    return (f"logged to MLflow run {run_id}" + (f": {link}{serve}" if link else f" at {uri}")
            + (" (compare runs: 'mlo-mae runs')" if uri.startswith("sqlite") else ""))


def _report(metrics: dict[str, Any], echo: Echo) -> None:
    digests = metrics.get("replica_digests") or []
    if len(digests) > 1:
        same = "identical" if metrics.get("replicas_identical") else "DIFFERENT"
        echo(f"{len(digests)} replicas {same}: " + "; ".join(
            f"rank {r} " + ", ".join(f"{k} {v}" for k, v in d.items()) for r, d in enumerate(digests)))
    if "checkpoint" in metrics:
        echo(f"final checkpoint: {metrics['checkpoint']}")


def new_run(cfg: config_mod.Config, launch: Launch, run: RunTracking | None, echo: Echo,
            warn: Echo) -> dict[str, Any]:
    """``mlo-mae pretrain``: a run under a name not taken yet."""
    check_device(cfg, launch)
    if read_run(launch.storage_path, launch.name) is not None:
        raise InputError(f"--name: run '{launch.name}' already exists in '{storage_uri(launch.storage_path)}'; "
                         f"continue it with --resume {launch.name} or choose another name")
    return pretrain(cfg, launch, run, echo, warn)


def resume_run(launch: Launch, workers_given: bool, echo: Echo, warn: Echo) -> dict[str, Any]:
    """``mlo-mae pretrain --resume NAME``: the saved config, workers and MLflow run of run ``launch.name``
    (``launch.workers`` must match when ``workers_given``)."""
    settings = read_run(launch.storage_path, launch.name)
    if settings is None:
        raise InputError(f"--resume: no run '{launch.name}' in '{storage_uri(launch.storage_path)}' "
                         "(see --storage-path)")
    if workers_given and launch.workers != settings["workers"]:
        raise InputError(f"--workers {launch.workers}: run '{launch.name}' was started with {settings['workers']} "
                         "workers and its data order depends on that; resume with the same number")
    try:
        cfg = config_mod.from_dict(settings["config"])
    except config_mod.ConfigError as err:
        raise InputError(f"run '{launch.name}': {err}") from None
    launch.workers = settings["workers"]
    check_device(cfg, launch)
    return pretrain(cfg, launch, RunTracking.saved(settings.get("mlflow")), echo, warn, resume=True)

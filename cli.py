"""The ``mlo-mae`` command.

Errors a user can fix (bad flags, config keys, presets, paths) print one line
``mlo-mae: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from mlo_mae import config as config_mod
from mlo_mae.config import PRESETS, ConfigError

EXIT_USAGE = 2


class UserError(click.ClickException):
    """A one-line, exit-2 error about the user's input."""

    exit_code = EXIT_USAGE


def _default(key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config_mod.Config(), section), name)


def _help(text: str, key: str) -> str:
    return f"{text} [config: {key}, default {_default(key)}]"


def _warn(text: str) -> None:
    click.echo(text, err=True)


def _tracking_uri(flag: str | None) -> str:
    from training.tracking import tracking_uri

    return tracking_uri(flag)


TRACKING_URI = click.option(
    "--tracking-uri", default=None, metavar="URI",
    help="MLflow tracking server or store (http://host:5000, sqlite:///path.db) [default: $MLFLOW_TRACKING_URI, "
         "else sqlite:///./mlflow.db in the working folder, artifacts in ./mlruns].")
EXPERIMENT = click.option("--experiment", default="mlo-mae", help="MLflow experiment the runs go to.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="mlo-mae", prog_name="mlo-mae")
def cli() -> None:
    """MLO-MAE: masked-autoencoder pretraining with a masking network learned by
    three-level optimisation for a downstream task."""


CONFIG_OPTIONS = (
    click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                 help="YAML config file (sections model, mlo, optim, data, run), or a built-in recipe: "
                      "'paper' (the paper's method with the authors' settings); flags override it."),
    click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
                 help="Model and recipe preset [default: tiny, or the config file's]."),
    click.option("--dataset", default=None,
                 help=_help("'digits' (built in) or a folder written by 'mlo-mae prepare'.", "data.dataset")),
    click.option("--max-steps", type=click.IntRange(min=1), default=None,
                 help="Iterations to train (each: Stage-I x unroll, Stage II, Stage III); overrides --epochs."),
    click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=None,
                 help=_help("Passes of Stage I over D_tr.", "run.epochs")),
    click.option("--batch-size", type=click.IntRange(min=1), default=None,
                 help="Batch size of every level [config: data.batch_mae/head/mask, default 32]."),
    click.option("--seed", type=int, default=None, help=_help("Seed of initialisation and data order.", "run.seed")),
    click.option("--baseline/--mlo", default=None,
                 help="Plain MAE (random masking, no Stage III) or MLO-MAE [config: mlo.baseline, default --mlo]."),
    click.option("--mask-ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
                 help=_help("Fraction of patches masked.", "mlo.mask_ratio")),
    click.option("--hypergradient", type=click.Choice(["fd", "exact"]), default=None,
                 help=_help("fd: one finite difference; exact: double backward (small models).",
                            "mlo.hypergradient")),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                 help=_help("Where to train; auto picks CUDA when present.", "run.device")),
    click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
                 help=_help("bf16 autocast (CUDA only) or fp32.", "run.precision")),
    click.option("--set", "-o", "overrides", multiple=True, metavar="KEY=VALUE",
                 help="Override any config key, e.g. -o optim.lr_mask=3e-4 (repeatable)."),
)
CLUSTER_OPTIONS = (
    click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="CPUs Ray reserves per worker [default: on CPU the cluster's CPUs but one (for Ray Data), "
                      "split between the workers, at least 0.5; on GPU 1, the rest decode]."),
    click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
                 help="GPUs per worker [default: 1 if the device is cuda, or auto on a cluster with GPUs; else 0]."),
    click.option("--address", envvar="RAY_ADDRESS", default=None,
                 help="Join the Ray cluster at this address (e.g. auto, or ray://head:10001) "
                      "[default: $RAY_ADDRESS, else start a local cluster sized to this machine]."),
    click.option("--storage-path", default="ray_results",
                 help="Where runs keep checkpoints (Ray Train storage). Multi-node runs need storage every node "
                      "sees: NFS or s3://..."),
)
CONFIG_FLAGS = {"dataset": "data.dataset", "max_steps": "run.max_steps", "epochs": "run.epochs", "seed": "run.seed",
                "baseline": "mlo.baseline", "mask_ratio": "mlo.mask_ratio", "hypergradient": "mlo.hypergradient",
                "device": "run.device", "precision": "run.precision"}


def _options(*options):
    """Apply a group of click options in the order they are listed (they show so in --help)."""
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _flat_config(flags: dict[str, Any]) -> dict[str, Any]:
    """The config keys the CONFIG_OPTIONS flags set (dotted), -o overrides first so named flags win."""
    flat: dict[str, Any] = dict(config_mod.parse_override(o) for o in flags["overrides"])
    if flags["batch_size"] is not None:
        flat.update({f"data.batch_{level}": flags["batch_size"] for level in ("mae", "head", "mask")})
    flat.update({key: flags[name] for name, key in CONFIG_FLAGS.items() if flags[name] is not None})
    return flat


@cli.command()
@_options(*CONFIG_OPTIONS)
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Data-parallel Ray Train workers (each: its share of every batch) [default: 1].")
@_options(*CLUSTER_OPTIONS)
@click.option("--name", default=None, help="Run name, a folder under --storage-path [default: pretrain-DATE-TIME].")
@click.option("--resume", "resume_name", default=None, metavar="NAME",
              help="Continue run NAME from its last checkpoint, with its saved config and workers.")
@TRACKING_URI
@EXPERIMENT
def pretrain(config_file: Path | None, preset: str | None, print_config: bool, workers: int | None,
             cpus_per_worker: float | None, gpus_per_worker: float | None, address: str | None,
             storage_path: str, name: str | None, resume_name: str | None, tracking_uri: str | None,
             experiment: str, **flags: Any) -> None:
    """Pretrain E, D, C and T with MLO-MAE (or plain MAE with --baseline).

    With no arguments: the tiny preset on the built-in digits, a few minutes on
    2 CPU cores, then a linear probe of the encoder on the held-out test split.
    With --workers N, Ray Train runs N data-parallel workers (CPU or GPU, here
    or on the cluster at --address); checkpoints go to --storage-path/NAME and a
    run restarts from the last one by itself when a worker dies. Every run is
    an MLflow run (metrics, heatmaps, the encoder for timm): see 'mlo-mae runs'.
    """
    flat = _flat_config(flags)
    if resume_name is not None:
        given = (sorted(k for k in flat) + (["--config"] if config_file else []) + (["--preset"] if preset else [])
                 + (["--tracking-uri"] if tracking_uri else []))
        if given or print_config or name:
            raise UserError(f"--resume continues a run with its saved settings; drop {', '.join(given) or '--name'}")
        _resume(resume_name, storage_path, workers, cpus_per_worker, gpus_per_worker, address)
        return
    tracking = {"uri": _tracking_uri(tracking_uri), "experiment": experiment}
    cfg = config_mod.resolve(config_file, preset, flat)
    if print_config:
        click.echo(cfg.to_yaml(), nl=False)
        return
    from training.launch import Launch

    launch = Launch(name=name or time.strftime("pretrain-%Y%m%d-%H%M%S"), storage_path=storage_path,
                    workers=workers or 1, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                    address=address)
    _run_pretrain(cfg, launch, tracking)


def _resume(name: str, storage_path: str, workers: int | None, cpus_per_worker: float | None,
            gpus_per_worker: float | None, address: str | None) -> None:
    from training.launch import Launch
    from training.storage import read_run, storage_uri

    settings = read_run(storage_path, name)
    if settings is None:
        raise UserError(f"--resume: no run '{name}' in '{storage_uri(storage_path)}' (see --storage-path)")
    if workers is not None and workers != settings["workers"]:
        raise UserError(f"--workers {workers}: run '{name}' was started with {settings['workers']} workers and "
                        "its data order depends on that; resume with the same number")
    try:
        cfg = config_mod.from_dict(settings["config"])
    except ConfigError as err:
        raise UserError(f"run '{name}': {err}") from None
    launch = Launch(name=name, storage_path=storage_path, workers=settings["workers"],
                    cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, address=address)
    _run_pretrain(cfg, launch, settings.get("mlflow"), resume=True)


@cli.command()
@click.option("--space", "space_name", default="default", metavar="FILE|NAME",
              help="Search-space YAML file, or a built-in space: default, cpu-smoke (see tune_spaces/).")
@click.option("--num-samples", type=click.IntRange(min=1), default=8,
              help="Trials to sample (each grid: entry multiplies them).")
@click.option("--workers-per-trial", type=click.IntRange(min=1), default=1, help="Ray Train workers of each trial.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
              help="Trials running at once [default: what the cluster fits: a GPU per worker, or on CPUs two CPUs "
                   "per worker with one left for Ray Data; at least 1].")
@click.option("--scheduler", type=click.Choice(["asha", "fifo"]), default="asha",
              help="asha: stop trials that are behind at each rung (ASHA on the evaluations); fifo: run all to "
                   "the end.")
@click.option("--grace-period", type=click.IntRange(min=1), default=None,
              help="ASHA: iterations a trial runs before it can be stopped [default: run.eval_every].")
@click.option("--reduction-factor", type=click.IntRange(min=2), default=2,
              help="ASHA: one trial in this many goes on past each rung.")
@click.option("--search", type=click.Choice(["random", "optuna"]), default="random",
              help="random (and grid: entries) or Optuna's TPE (pip install 'mlo-mae[optuna]').")
@click.option("--search-seed", type=int, default=0, help="Seed of the sampling of the space.")
@click.option("--metric", default="val_top1",
              help="What ranks trials: val_top1 (D_val top-1 of the level-3 head C on E; higher is better), "
                   "val_loss (lower), or probe_val_top1 (the end-of-run linear probe on D_val; --scheduler fifo).")
@_options(*CONFIG_OPTIONS, *CLUSTER_OPTIONS)
@click.option("--name", default=None, help="Study name, a folder under --storage-path [default: tune-DATE-TIME].")
@click.option("--resume", "resume_name", default=None, metavar="NAME",
              help="Continue study NAME: unfinished trials go on from their last checkpoints, then new ones start.")
@TRACKING_URI
@EXPERIMENT
def tune(space_name: str, num_samples: int, workers_per_trial: int, max_concurrent: int | None, scheduler: str,
         grace_period: int | None, reduction_factor: int, search: str, search_seed: int, metric: str,
         config_file: Path | None, preset: str | None, cpus_per_worker: float | None, gpus_per_worker: float | None,
         address: str | None, storage_path: str, name: str | None, resume_name: str | None,
         tracking_uri: str | None, experiment: str, **flags: Any) -> None:
    """Search hyperparameters with Ray Tune: each trial is a pretrain run with sampled settings.

    The space file says which config keys vary and how; every pretrain flag
    (and the file's fixed: keys) sets the base they vary from. Trials report
    their evaluations as they train, and ASHA stops those that fall behind.
    The study is an MLflow parent run with one child run per trial; at the end
    a results table is printed, and the best trial's whole config is written to
    STORAGE/NAME/best-config.yaml, ready for 'mlo-mae pretrain --config'.
    """
    from tune_spaces.space import SpaceError, load_space

    from training.study import StudyError, StudyOptions

    if resume_name is not None:
        ctx = click.get_current_context()
        given = [p.opts[-1] for p in ctx.command.params if p.name not in ("resume_name", "storage_path", "address")
                 and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)]
        if given:
            raise UserError(f"--resume continues a study with its saved settings; drop {', '.join(given)}")
        _resume_study(resume_name, storage_path, address)
        return
    try:
        space = load_space(space_name)
    except SpaceError as err:
        raise UserError(f"--space: {err}") from None
    flat = _flat_config(flags)
    searched = sorted(set(flat) & set(space.params))
    if searched:
        raise UserError(f"{searched[0]} is searched by {space.path}; drop it from the flags or from the space")
    base = config_mod.resolve(config_file, preset, {**space.fixed, **flat})
    options = StudyOptions(num_samples=num_samples, workers_per_trial=workers_per_trial,
                           max_concurrent=max_concurrent, scheduler=scheduler, grace_period=grace_period,
                           reduction_factor=reduction_factor, search=search, search_seed=search_seed, metric=metric,
                           cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    try:
        _new_study(space, base, options, name or time.strftime("tune-%Y%m%d-%H%M%S"), storage_path, address,
                   {"uri": _tracking_uri(tracking_uri), "experiment": experiment})
    except StudyError as err:
        raise UserError(str(err)) from None


def _study_cluster(address: str | None) -> dict[str, float]:
    import ray

    from training.launch import TrainingError, connect

    try:
        connect(address)
    except TrainingError as err:
        raise click.ClickException(str(err)) from None
    return ray.cluster_resources()


def _new_study(space, base: config_mod.Config, options, name: str, storage_path: str, address: str | None,
               mlflow: dict[str, str]) -> None:
    from training import study, tracking
    from training.launch import batch_problem, warn_local_store
    from training.storage import storage_uri

    study.check_options(options, space, base)
    study.check_space_on(space, base)
    if study.read_settings(storage_path, name) is not None:
        raise UserError(f"--name: study '{name}' already exists in '{storage_uri(storage_path)}'; continue it "
                        f"with --resume {name} or choose another name")
    data = open_dataset(base.data.dataset)
    problem = batch_problem(study.largest_batches(space, base), data, options.workers_per_trial)
    if problem:
        raise UserError(problem + (f" (the largest batch of {space.path})"
                                   if any(k.startswith("data.batch_") for k in space.params) else ""))
    cluster = _study_cluster(address)
    warn_local_store(mlflow["uri"], _warn)
    trials = options.num_samples * space.grid_size
    concurrent = study.concurrency(options, base, cluster, trials)
    study.check_fits(options, base, cluster, concurrent)
    settings = study.study_settings(name, storage_path, base, str(data.root.resolve()), data.count("train"),
                                    options, concurrent, {**mlflow, "run_id": None})
    try:
        study.start(settings, space, base)
    except tracking.TrackingError as err:
        raise UserError(f"--tracking-uri: {err}") from None
    max_t = study.longest_trial(space, base, data.count("train"))
    asha = (f"ASHA on {options.metric} (grace {study.grace_period(options, base.run.eval_every, max_t)}, "
            f"reduction {options.reduction_factor}, up to {max_t} iterations)" if options.scheduler == "asha"
            else "FIFO (every trial to its end)")
    click.echo(f"study '{name}': {trials} trial(s) of {space.path} ({', '.join(space.params)}) | {asha} | "
               f"{options.search} search, seed {options.search_seed} | {concurrent} at once, "
               f"{options.workers_per_trial} worker(s) each | {data.manifest['name']}, preset {base.preset}")
    click.echo(f"MLflow parent run {settings['mlflow']['run_id']} (experiment '{mlflow['experiment']}') at "
               f"{mlflow['uri']}; trials in {settings['trials_path']}")
    _run_study(settings, space, resume=False)


def _resume_study(name: str, storage_path: str, address: str | None) -> None:
    from tune_spaces.space import SpaceError, load_space

    from training import study
    from training.storage import storage_uri

    settings = study.read_settings(storage_path, name)
    if settings is None:
        raise UserError(f"--resume: no study '{name}' in '{storage_uri(storage_path)}' (see --storage-path)")
    try:
        space = load_space(f"{settings['storage']}/{name}/{study.SPACE_COPY}")
    except SpaceError as err:
        raise UserError(f"--resume: {err}") from None
    _study_cluster(address)
    click.echo(f"study '{name}': resuming ({study.expected_trials(settings, space)} trial(s) in all)")
    _run_study(settings, space, resume=True)


def _run_study(settings: dict[str, Any], space, resume: bool) -> None:
    from training import study, tracking

    try:
        outcome = study.run(settings, space, click.echo, resume=resume)
    except study.StudyInterrupted as stop:
        click.echo(f"interrupted; the finished trials and the checkpoints are kept: continue with 'mlo-mae tune "
                   f"--resume {settings['name']}'" + (f" --storage-path {settings['storage']}"
                                                      if settings["storage"] != os.path.abspath("ray_results")
                                                      else ""), err=True)
        sys.exit(128 + stop.signum)
    except (study.StudyError, tracking.TrackingError) as err:
        raise click.ClickException(str(err)) from None
    metric = settings["options"]["metric"]
    header, body = study.table(outcome.rows, metric)
    click.echo(f"study '{settings['name']}': {len(outcome.rows)} trial(s)")
    _echo_table(header, body)
    if outcome.best is None:
        raise click.ClickException(f"no trial ran to its end with a {metric}; see the table above (the trials' "
                                   "output is in the Ray logs, /tmp/ray/session_latest/logs)")
    best = outcome.best
    click.echo(f"best: trial {best.number}, {metric} {best.metric:.4f} (MLflow run {best.run_id}) | config: "
               f"{outcome.folder}/{study.BEST_CONFIG} (mlo-mae pretrain --config ...)")
    uri = settings["mlflow"]["uri"]
    click.echo(f"compare the trials: 'mlflow ui --backend-store-uri {uri}', experiment "
               f"'{settings['mlflow']['experiment']}', run '{settings['name']}'" if uri.startswith("sqlite")
               else f"compare the trials in MLflow at {uri}, run '{settings['name']}'")


def digits_cache() -> Path:
    """Where the built-in digits are prepared once: $MLO_MAE_DATA_DIR, else ~/.cache/mlo-mae."""
    root = os.environ.get("MLO_MAE_DATA_DIR") or Path.home() / ".cache" / "mlo-mae"
    return Path(root) / "digits-v1"


def open_dataset(name: str):
    """'digits' (prepared on first use) or a folder written by 'mlo-mae prepare'."""
    from pipelines.manifest import DatasetError, load_prepared

    try:
        if name == "digits":
            path = digits_cache()
            if not (path / "manifest.json").is_file():
                from pipelines.prepare import prepare

                click.echo(f"preparing the built-in digits in {path} (once)")
                path.parent.mkdir(parents=True, exist_ok=True)
                prepare("digits", path, shard_rows=256, progress=_progress_bar, log=click.echo)
            return load_prepared(path)
        return load_prepared(name)
    except DatasetError as err:
        raise UserError(f"--dataset: {err}") from None


def _progress_bar(phase: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=phase, unit="img", file=sys.stderr, dynamic_ncols=True,
                disable=None, mininterval=0.5)


def _run_pretrain(cfg: config_mod.Config, launch, tracking: dict[str, str] | None, resume: bool = False) -> None:
    from mlo_mae.config import lr_scale
    from mlo_mae.engine import resolve_device
    from training import tracking as mlflow_tracking
    from training.launch import TrainingError, TrainingInterrupted, batch_problem, run_params, run_pretrain
    from training.storage import read_run, storage_uri, write_run
    from training.worker import total_iterations

    try:
        device = resolve_device(cfg.run.device) if launch.address is None else None
    except ValueError as err:
        raise UserError(str(err)) from None
    on_cuda = device.type == "cuda" if device is not None else cfg.run.device == "cuda"  # remote: as asked
    if cfg.run.precision == "bf16" and not on_cuda:
        raise UserError("--precision bf16 needs a CUDA device; use fp32 on CPU (or --device cuda on a GPU cluster)")
    if not resume and read_run(launch.storage_path, launch.name) is not None:
        raise UserError(f"--name: run '{launch.name}' already exists in '{storage_uri(launch.storage_path)}'; "
                        f"continue it with --resume {launch.name} or choose another name")
    data = open_dataset(cfg.data.dataset)
    n = launch.workers
    problem = batch_problem(cfg, data, n)
    if problem:
        raise UserError(problem)
    total = total_iterations(cfg, data.count("train"))
    mode = "baseline MAE (random masking)" if cfg.mlo.baseline else f"MLO-MAE ({cfg.mlo.hypergradient} hypergradient)"
    click.echo(f"{mode} | preset {cfg.preset} | {data.manifest['name']}: D_tr {data.count('train')}, "
               f"D_val {data.count('val')}, test {data.count('test')} | {total} iterations (unroll "
               f"{cfg.mlo.unroll_mae}/{cfg.mlo.unroll_head}/{cfg.mlo.unroll_mask}) | device "
               f"{device if device is not None else cfg.run.device}")
    o, scale = cfg.optim, lr_scale(cfg.optim.lr_scaling, n)
    click.echo(f"{n} worker(s) | global batch {n * cfg.data.batch_mae} (= {n} x {cfg.data.batch_mae} per worker) | "
               f"lr scaling '{o.lr_scaling}' x{scale:g}: lr_mae {o.lr_mae * scale:.3g}, lr_head "
               f"{o.lr_head * scale:.3g}, lr_mask {o.lr_mask * scale:.3g}")
    run_dir = f"{storage_uri(launch.storage_path)}/{launch.name}"
    click.echo(f"run '{launch.name}' in {storage_uri(launch.storage_path)}"
               + (" (resuming from its last checkpoint)" if resume else ""))
    try:
        if tracking is not None and resume:
            mlflow_tracking.reopen_run(tracking["uri"], tracking["run_id"])
        elif tracking is not None:
            tracking["run_id"] = mlflow_tracking.start_run(tracking["uri"], tracking["experiment"], launch.name,
                                                           "pretrain", cfg, run_params(cfg, data, n),
                                                           {mlflow_tracking.RUN_DIR_TAG: run_dir})
    except mlflow_tracking.TrackingError as err:
        raise UserError(f"--tracking-uri: {err}") from None
    if tracking is not None:
        click.echo(f"MLflow run {tracking['run_id']} (experiment '{tracking['experiment']}') at {tracking['uri']}")
    if not resume:
        write_run(launch.storage_path, launch.name, {"config": cfg.to_dict(), "dataset": str(data.root.resolve()),
                                                    "workers": n, "mlflow": tracking})
    logged = {"uri": tracking["uri"], "run_id": tracking["run_id"]} if tracking is not None else None

    def end(status: str) -> None:  # the training's outcome stands even if the tracking store is gone
        if tracking is not None:
            mlflow_tracking.end_run(tracking["uri"], tracking["run_id"], status, _warn)

    try:
        metrics = run_pretrain(cfg, data, launch, click.echo, logged)
    except TrainingInterrupted as stop:
        end("KILLED")
        click.echo(f"interrupted; the checkpoints are kept: continue with 'mlo-mae pretrain --resume "
                   f"{launch.name}'" + (f" --storage-path {launch.storage_path}"
                                        if launch.storage_path != "ray_results" else ""), err=True)
        sys.exit(128 + stop.signum)
    except TrainingError as err:
        end("FAILED")
        raise click.ClickException(str(err)) from None
    except BaseException:
        end("FAILED")  # an unexpected error: the MLflow run must not stay RUNNING
        raise
    digests = metrics.get("replica_digests") or []
    if len(digests) > 1:
        same = "identical" if metrics.get("replicas_identical") else "DIFFERENT"
        click.echo(f"{len(digests)} replicas {same}: " + "; ".join(
            f"rank {r} " + ", ".join(f"{k} {v}" for k, v in d.items()) for r, d in enumerate(digests)))
    if "checkpoint" in metrics:
        click.echo(f"final checkpoint: {metrics['checkpoint']}")
    if tracking is not None:
        if "checkpoint" in metrics:
            try:
                mlflow_tracking.record_checkpoint(tracking["uri"], tracking["run_id"], metrics["checkpoint"],
                                                  run_dir, launch.name)
            except mlflow_tracking.TrackingError as err:
                _warn(f"warning: {err}")
        end("FINISHED")
        click.echo(f"logged to MLflow run {tracking['run_id']}: compare runs with 'mlo-mae runs' or "
                   f"'mlflow ui --backend-store-uri {tracking['uri']}'" if tracking["uri"].startswith("sqlite")
                   else f"logged to MLflow run {tracking['run_id']} at {tracking['uri']}")


@cli.command()
@click.argument("source")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--test-source", type=click.Path(path_type=Path), default=None,
              help="ImageFolder tree of the official test/val split [default: carve 20% of SOURCE].")
@click.option("--seed", type=int, default=0, help="Seed of the stratified split and of the row order.")
@click.option("--labels", "cifar_labels", type=click.Choice(["fine", "coarse"]), default="fine",
              help="CIFAR-100 label set: 100 fine or 20 coarse classes.")
@click.option("--shard-size-mb", type=click.FloatRange(min=0, min_open=True), default=128.0,
              help="Target size of one Parquet shard.")
@click.option("--shard-rows", type=click.IntRange(min=1), default=None,
              help="Rows per shard instead of a size target.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Processes that decode and write [default: all cores].")
@click.option("--on-bad-image", type=click.Choice(["skip", "fail"]), default="skip",
              help="skip: leave unreadable inputs out and list them in the manifest; fail: stop at the first.")
def prepare(source: str, out: Path, test_source: Path | None, seed: int, cifar_labels: str,
            shard_size_mb: float, shard_rows: int | None, jobs: int | None, on_bad_image: str) -> None:
    """Turn SOURCE into Parquet shards in OUT with the fixed train/val/test splits.

    SOURCE is 'digits' (built in), an ImageFolder tree (one folder per class,
    as ImageNet's train set), CIFAR-10/100 'python' archives
    (cifar-10-python.tar.gz, cifar-100-python.tar.gz, or their extracted
    folders), or a folder of MNIST-format IDX files as MNIST, Fashion-MNIST
    and KMNIST are distributed (train-images-idx3-ubyte[.gz],
    train-labels-idx1-ubyte[.gz], t10k-*; e.g.
    /usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist).
    Splits: test = the official one (CIFAR, IDX t10k, --test-source) or 20%
    carved per class; val (D_val) = 20% of the rest per class; train (D_tr)
    the remaining 80%. OUT gets train/, val/, test/ and manifest.json.
    """
    from pipelines.prepare import PrepareError
    from pipelines.prepare import prepare as run_prepare

    started = time.perf_counter()
    try:
        manifest = run_prepare(source, out, test_source=test_source, seed=seed, cifar_labels=cifar_labels,
                               shard_mb=shard_size_mb, shard_rows=shard_rows, jobs=jobs,
                               on_bad_image=on_bad_image, progress=_progress_bar, log=click.echo)
    except PrepareError as err:
        raise UserError(str(err)) from None
    counts = manifest["counts"]
    skipped = manifest["skipped"]
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped["by_reason"].items())
    click.echo(f"{out}: {len(manifest['classes'])} classes | train {counts['train']['total']}, "
               f"val {counts['val']['total']}, test {counts['test']['total']} | "
               f"{len(manifest['shards'])} shards | skipped {skipped['total']}"
               f"{f' ({reasons})' if reasons else ''} | {time.perf_counter() - started:.1f}s")
    if manifest["empty_classes"]:
        click.echo(f"warning: class folders with no usable image: {', '.join(manifest['empty_classes'])}",
                   err=True)


def _downstream_setup(source: str, dataset: str | None, device: str, tracking_uri: str | None):
    """The pretrained state, its data set and device, or a one-line error."""
    from mlo_mae.engine import resolve_device
    from training.pretrained import SourceError, load_pretrained

    try:
        pretrained = load_pretrained(source, _tracking_uri(tracking_uri), prefer_given=tracking_uri is not None)
        torch_device = resolve_device(device)
    except (SourceError, ValueError) as err:
        raise UserError(str(err)) from None
    name = dataset or pretrained.dataset or pretrained.config.data.dataset
    data = open_dataset(name)
    if data.num_classes != pretrained.state["num_classes"] and dataset is None:
        raise UserError(f"--dataset: '{name}' has {data.num_classes} classes, the run trained with "
                        f"{pretrained.state['num_classes']}")
    click.echo(f"{pretrained.checkpoint} (iteration {pretrained.iteration}, preset {pretrained.config.preset}) | "
               f"{data.manifest['name']}: D_tr {data.count('train')}, D_val {data.count('val')}, "
               f"test {data.count('test')} | device {torch_device}")
    return pretrained, data, torch_device


def _child_run(pretrained, kind: str, experiment: str, params: dict, tracking_uri: str | None) -> tuple[str, str]:
    """An MLflow run for this evaluation: a child of the pretrain run when that was tracked."""
    from training import tracking

    uri = pretrained.tracking_uri or _tracking_uri(tracking_uri)
    parent = pretrained.run_id
    if parent is not None:
        try:
            experiment = tracking.client(uri).get_experiment(
                tracking.client(uri).get_run(parent).info.experiment_id).name
        except Exception:  # noqa: BLE001 - parent gone: log a standalone run
            parent = None
    try:
        run_id = tracking.start_run(uri, experiment, kind, kind, pretrained.config,
                                    {"source.checkpoint": pretrained.checkpoint,
                                     "source.iteration": pretrained.iteration, **params},
                                    parent=parent)
    except tracking.TrackingError as err:
        raise UserError(f"--tracking-uri: {err}") from None
    return uri, run_id


@cli.command()
@click.argument("source")
@click.option("--dataset", default=None, help="Data set to probe on [default: the one the run trained on].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="Where to run.")
@TRACKING_URI
@EXPERIMENT
def probe(source: str, dataset: str | None, device: str, tracking_uri: str | None, experiment: str) -> None:
    """Linear probe of a pretrained encoder: frozen, eval mode, CLS features, one linear layer.

    SOURCE: a checkpoint folder, a run folder (its newest checkpoint) or an
    MLflow run id of a pretrain run.

    The L2 strength is chosen on D_val; the test split is read once, at the end.
    Logged as an MLflow run 'probe' (a child of the pretrain run, whose
    probe/val_top1 and probe/test_top1 it also sets).
    """
    from training import tracking
    from training.downstream import probe_encoder

    pretrained, data, torch_device = _downstream_setup(source, dataset, device, tracking_uri)
    uri, run_id = _child_run(pretrained, "probe", experiment, {"dataset.path": str(data.root)}, tracking_uri)
    started = time.perf_counter()
    with _ends_run_on_error(uri, run_id):
        result = probe_encoder(pretrained.encoder(torch_device), data, pretrained.config, torch_device)
    click.echo(f"linear probe: D_val top-1 {100 * result.val_top1:.1f}% (L2 {result.weight_decay:g} chosen on "
               f"D_val) | test top-1 {100 * result.test_top1:.1f}% | {time.perf_counter() - started:.1f}s")
    logger = tracking.RunLogger(uri, run_id, _warn)
    logger.metrics({"val_top1": result.val_top1, "test_top1": result.test_top1,
                    "weight_decay": result.weight_decay}, pretrained.iteration)
    logger.flush()
    _copy_to_parent(uri, pretrained, {"probe/val_top1": result.val_top1, "probe/test_top1": result.test_top1})
    tracking.end_run(uri, run_id, "FINISHED", _warn)
    click.echo(f"logged to MLflow run {run_id}")


@contextlib.contextmanager
def _ends_run_on_error(uri: str, run_id: str):
    """An evaluation that fails or is interrupted ends its MLflow run as FAILED / KILLED (never RUNNING);
    a data or value error becomes one line."""
    from training import tracking

    try:
        yield
    except KeyboardInterrupt:
        tracking.end_run(uri, run_id, "KILLED", _warn)
        raise
    except Exception as err:
        tracking.end_run(uri, run_id, "FAILED", _warn)
        if isinstance(err, (ValueError, OSError)):  # DatasetError, a bad shard, a non-finite loss
            raise click.ClickException(" ".join(str(err).split())[:400]) from None
        raise


def _copy_to_parent(uri: str, pretrained, values: dict[str, float]) -> None:
    from training import tracking

    if pretrained.run_id is not None:
        parent = tracking.RunLogger(uri, pretrained.run_id, _warn)
        parent.metrics(values, pretrained.iteration)
        parent.flush()


@cli.command()
@click.argument("source")
@click.option("--epochs", type=click.IntRange(min=1), default=100, help="Fine-tuning epochs over D_tr.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, help="AdamW peak learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Batch size.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.05, help="AdamW weight decay.")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=0.0, help="Linear warmup before the cosine.")
@click.option("--layer-decay", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              help="Layer-wise lr decay (1: off, the CIFAR protocol; 0.75: MAE's ImageNet recipe).")
@click.option("--drop-path", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              help="Stochastic depth (0.1 in MAE's ImageNet recipe).")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              help="Label smoothing (0.1 in MAE's ImageNet recipe).")
@click.option("--seed", type=int, default=0, help="Seed of the head's initialisation and the data order.")
@click.option("--dataset", default=None, help="Data set to fine-tune on [default: the one the run trained on].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="Where to run.")
@TRACKING_URI
@EXPERIMENT
def finetune(source: str, epochs: int, lr: float, batch_size: int, weight_decay: float, warmup_epochs: float,
             layer_decay: float, drop_path: float, label_smoothing: float, seed: int, dataset: str | None,
             device: str, tracking_uri: str | None, experiment: str) -> None:
    """Fine-tune a pretrained encoder with a fresh linear head (timm VisionTransformer), all weights.

    SOURCE: a checkpoint folder, a run folder (its newest checkpoint) or an
    MLflow run id of a pretrain run.

    The paper's protocol: AdamW, cosine schedule, crop + flip; the defaults are
    its CIFAR recipe. Training reads D_tr, the epoch kept is the best on D_val,
    and the test split is read once, with those weights, at the end. Logged as
    an MLflow run 'finetune' (a child of the pretrain run, whose
    finetune/val_top1 and finetune/test_top1 it also sets).
    """
    from mlo_mae.finetune import FinetuneConfig
    from training import tracking
    from training.downstream import finetune_encoder

    pretrained, data, torch_device = _downstream_setup(source, dataset, device, tracking_uri)
    ft = FinetuneConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                        layer_decay=layer_decay, drop_path=drop_path, label_smoothing=label_smoothing, seed=seed)
    params = {f"finetune.{k}": v for k, v in dataclasses.asdict(ft).items()}
    uri, run_id = _child_run(pretrained, "finetune", experiment,
                             {**params, "finetune.batch_size": batch_size, "dataset.path": str(data.root)},
                             tracking_uri)
    logger = tracking.RunLogger(uri, run_id, _warn)
    best = {"top1": -1.0, "epoch": 0}

    def on_epoch(result) -> None:  # epochs count from 1 on screen and in MLflow
        if result.val_top1 > best["top1"]:
            best.update(top1=result.val_top1, epoch=result.epoch + 1)
        click.echo(f"epoch {result.epoch + 1}/{epochs} | loss {result.train_loss:.4f} | D_val top-1 "
                   f"{100 * result.val_top1:.1f}% (best {100 * best['top1']:.1f}% at epoch {best['epoch']}) | "
                   f"lr {result.lr:.2e} | {result.seconds:.1f}s")
        logger.metrics({"train_loss": result.train_loss, "val_top1": result.val_top1, "lr": result.lr},
                       result.epoch + 1)
        logger.flush()

    with _ends_run_on_error(uri, run_id):
        result = finetune_encoder(pretrained.encoder(torch_device), data, pretrained.config, ft, batch_size,
                                  torch_device, on_epoch)
    click.echo(f"fine-tuned: D_val top-1 {100 * result.val_top1:.1f}% (epoch {result.best_epoch + 1} of {epochs}) "
               f"| test top-1 {100 * result.test_top1:.1f}%")
    logger.metrics({"test_top1": result.test_top1, "best_epoch": result.best_epoch + 1}, epochs)
    logger.flush()
    _copy_to_parent(uri, pretrained, {"finetune/val_top1": result.val_top1, "finetune/test_top1": result.test_top1})
    tracking.end_run(uri, run_id, "FINISHED", _warn)
    click.echo(f"logged to MLflow run {run_id}")


RUN_COLUMNS = (  # header, where, key, format
    ("run", "id", None, "{:.8}"), ("name", "tag", "mlflow.runName", "{}"), ("mode", "tag", "mlo_mae.mode", "{}"),
    ("preset", "tag", "mlo_mae.preset", "{}"), ("mask", "param", "mlo.mask_ratio", "{}"),
    ("lr_mask", "param", "optim.lr_mask", "{}"), ("seed", "param", "run.seed", "{}"),
    ("steps", "param", "total_iterations", "{}"), ("status", "status", None, "{}"),
    ("eval val@1", "metric", "eval/val_top1", "{:.1%}"), ("probe val@1", "metric", "probe/val_top1", "{:.1%}"),
    ("probe test@1", "metric", "probe/test_top1", "{:.1%}"),
    ("ft val@1", "metric", "finetune/val_top1", "{:.1%}"), ("ft test@1", "metric", "finetune/test_top1", "{:.1%}"),
)


@cli.command()
@TRACKING_URI
@EXPERIMENT
@click.option("--max-results", type=click.IntRange(min=1), default=50, help="Most recent runs to list.")
def runs(tracking_uri: str | None, experiment: str, max_results: int) -> None:
    """List the pretrain runs of an experiment with their downstream results (newest first).

    The same numbers, with curves and heatmaps, are in the MLflow UI:
    'mlflow ui --backend-store-uri URI'.
    """
    from training import tracking

    uri = _tracking_uri(tracking_uri)
    try:
        client = tracking.client(uri)
        exp = tracking.experiment_id(client, experiment, create=False)
        if exp is None:
            raise UserError(f"--experiment: no experiment '{experiment}' at {uri}")
        found = client.search_runs([exp], filter_string=f"tags.{tracking.KIND_TAG} = 'pretrain'",
                                   order_by=["attributes.start_time DESC"], max_results=max_results)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - MlflowException, connection errors
        raise UserError(f"--tracking-uri: cannot read {uri}: {' '.join(str(err).split())[:200]}") from None
    rows = []
    for run in found:
        row = []
        for _, where, key, fmt in RUN_COLUMNS:
            value = {"id": run.info.run_id, "status": run.info.status, "tag": run.data.tags.get(key),
                     "param": run.data.params.get(key), "metric": run.data.metrics.get(key)}[where]
            row.append("-" if value is None else fmt.format(value))
        rows.append(row)
    click.echo(f"experiment '{experiment}' at {uri}: {len(rows)} pretrain run(s)")
    _echo_table([c[0] for c in RUN_COLUMNS], rows)


def _echo_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def _fail(message: str, code: int) -> None:
    click.echo("mlo-mae: error: " + " ".join(message.split()), err=True)
    sys.exit(code)


def main() -> None:
    """Console entry point: one-line errors, exit 2 for bad input."""
    try:
        rv = cli.main(standalone_mode=False)
    except click.ClickException as err:  # bad flag, value, option or command (UsageError), UserError
        _fail(err.format_message(), err.exit_code)
    except ConfigError as err:
        _fail(str(err), EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("mlo-mae: interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()

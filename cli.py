"""The ``mlo-mae`` command: each command parses its arguments, makes one call into ``training`` or
``pipelines`` and prints the outcome.

Every layer below raises the errors of ``mlo_mae.errors``; ``main`` turns them
into one line ``mlo-mae: error: ...`` and an exit status (2: bad input, 1: the
work failed, 128 + signal: interrupted, with how to continue). Arguments that
can be checked without torch, Ray or MLflow are checked before those load.
"""

from __future__ import annotations

import sys
import time
import typing
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from mlo_mae import config as config_mod
from mlo_mae.config import CHOICES, PRESETS
from mlo_mae.errors import InputError, Interrupted, RunFailed


def _warn(text: str) -> None:
    click.echo(text, err=True)


def _config_default(key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config_mod.Config(), section), name)


def _checked(key: str):
    """A click callback that checks a flag's value with the config's own rules, naming the flag."""
    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            try:
                config_mod.with_overrides(config_mod.Config(), {key: value})
            except config_mod.ConfigError as err:
                raise click.BadParameter(str(err), ctx, param) from None
        return value

    return check


def config_flag(key: str, text: str) -> Any:
    """``--NAME`` for config key ``section.NAME``: its type, choices and default come from the config."""
    section, name = key.split(".")
    hint = typing.get_type_hints(type(getattr(config_mod.Config(), section)))[name]
    kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)  # int | None -> int
    click_type = click.Choice(CHOICES[key]) if key in CHOICES else kind
    return click.option(f"--{name.replace('_', '-')}", name, type=click_type, default=None, callback=_checked(key),
                        help=f"{text} [config: {key}, default {_config_default(key)}]")


# The config keys with a flag of their own; any other key is set with -o KEY=VALUE.
NAMED_KEYS = {
    "data.dataset": "'digits' (built in) or a folder written by 'mlo-mae prepare'.",
    "run.max_steps": "Iterations to train (each: Stage-I x unroll, Stage II, Stage III); overrides --epochs.",
    "run.epochs": "Passes of Stage I over D_tr.",
    "run.seed": "Seed of initialisation and data order.",
    "mlo.mask_ratio": "Fraction of patches masked.",
    "mlo.hypergradient": "fd: one finite difference; exact: double backward (small models).",
    "run.device": "Where to train; auto picks CUDA when present.",
    "run.precision": "bf16 autocast (CUDA only) or fp32.",
}
TRACKING_URI = click.option(
    "--tracking-uri", default=None, metavar="URI",
    help="MLflow tracking server or store (http://host:5000, sqlite:///path.db) [default: $MLFLOW_TRACKING_URI, "
         "else sqlite:///./mlflow.db in the working folder, artifacts in ./mlruns].")
EXPERIMENT = click.option("--experiment", default="mlo-mae", help="MLflow experiment the runs go to.")
CONFIG_OPTIONS = (
    click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                 help="YAML config file (sections model, mlo, optim, data, run), or a built-in recipe: "
                      "'paper' (the paper's method with the authors' settings); flags override it."),
    click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
                 help="Model and recipe preset [default: tiny, or the config file's]."),
    *(config_flag(key, text) for key, text in NAMED_KEYS.items()),
    click.option("--batch-size", type=click.IntRange(min=1), default=None,
                 help="Batch size of every level [config: data.batch_mae/head/mask, default 32]."),
    click.option("--baseline/--mlo", default=None,
                 help="Plain MAE (random masking, no Stage III) or MLO-MAE [config: mlo.baseline, default --mlo]."),
    click.option("--set", "-o", "overrides", multiple=True, metavar="KEY=VALUE",
                 help="Override any config key, e.g. -o optim.lr_mask=3e-4 (repeatable)."),
)
CLUSTER_OPTIONS = (
    click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="CPUs Ray reserves per worker [default: on CPU the cluster's CPUs but one (for Ray Data), "
                      "split between the workers, at least 0.5; on GPU 1, the rest decode]."),
    click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
                 help="GPUs per worker [default: 1 if the device is cuda, or auto on a cluster with GPUs; else 0]."),
    click.option("--placement", type=click.Choice(["pack", "spread"]), default="pack",
                 help="Where Ray puts a run's workers: pack (as few nodes as fit) or spread (one a node where it "
                      "can). Both fall back to what is free, e.g. after a node is lost."),
    click.option("--address", envvar="RAY_ADDRESS", default=None,
                 help="Join the Ray cluster at this address (e.g. auto, or ray://head:10001) "
                      "[default: $RAY_ADDRESS, else start a local cluster sized to this machine]."),
    click.option("--storage-path", default="ray_results",
                 help="Where runs keep checkpoints (Ray Train storage). Multi-node runs need storage every node "
                      "sees: NFS or s3://..."),
)


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
    if flags["baseline"] is not None:
        flat["mlo.baseline"] = flags["baseline"]
    flat.update({key: flags[key.split(".")[1]] for key in NAMED_KEYS if flags[key.split(".")[1]] is not None})
    return flat


def _given(ctx: click.Context, keep: tuple[str, ...]) -> list[str]:
    """The flags set on the command line, but ``keep``: what ``--resume`` refuses (it uses the saved ones)."""
    return [p.opts[-1] for p in ctx.command.params if p.name not in keep
            and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)]


def _tracking(flag: str | None, experiment: str):
    """The MLflow store to use, checked before anything starts (an unreachable server fails in seconds)."""
    from training import tracking

    uri = tracking.tracking_uri(flag)
    try:
        tracking.check_store(uri)
    except tracking.TrackingError as err:
        raise InputError(f"--tracking-uri: {err}") from None
    return uri, experiment


def _echo_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="mlo-mae", prog_name="mlo-mae")
def cli() -> None:
    """MLO-MAE: masked-autoencoder pretraining with a masking network learned by
    three-level optimisation for a downstream task."""


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
             cpus_per_worker: float | None, gpus_per_worker: float | None, placement: str, address: str | None,
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
    ctx = click.get_current_context()
    if resume_name is not None:
        given = _given(ctx, ("resume_name", "storage_path", "address", "workers", "cpus_per_worker",
                             "gpus_per_worker", "placement"))
        if given:
            raise InputError(f"--resume continues a run with its saved settings; drop {', '.join(given)}")
        _check_storage(storage_path)
        from training.launch import Launch
        from training.pretrain import resume_run

        resume_run(Launch(name=resume_name, storage_path=storage_path, workers=workers or 1,
                          cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, address=address,
                          placement=placement),
                   workers is not None, click.echo, _warn)
        return
    cfg = config_mod.resolve(config_file, preset, _flat_config(flags))
    if print_config:
        click.echo(cfg.to_yaml(), nl=False)
        return
    _check_storage(storage_path)
    _check_dataset(cfg.data.dataset)
    uri, experiment = _tracking(tracking_uri, experiment)
    from training.launch import Launch
    from training.pretrain import RunTracking, new_run

    launch = Launch(name=name or time.strftime("pretrain-%Y%m%d-%H%M%S"), storage_path=storage_path,
                    workers=workers or 1, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                    address=address, placement=placement)
    new_run(cfg, launch, RunTracking(uri, experiment), click.echo, _warn)


def _check_storage(storage_path: str) -> None:
    """An object-store --storage-path must answer before anything starts."""
    from pipelines.location import check_reachable

    check_reachable(storage_path, "--storage-path")


def _check_dataset(name: str) -> None:
    from pipelines.catalog import DatasetError, check_name

    try:
        check_name(name)
    except DatasetError as err:
        raise InputError(f"--dataset: {err}") from None


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
         placement: str, address: str | None, storage_path: str, name: str | None, resume_name: str | None,
         tracking_uri: str | None, experiment: str, **flags: Any) -> None:
    """Search hyperparameters with Ray Tune: each trial is a pretrain run with sampled settings.

    The space file says which config keys vary and how; every pretrain flag
    (and the file's fixed: keys) sets the base they vary from. Trials report
    their evaluations as they train, and ASHA stops those that fall behind.
    The study is an MLflow parent run with one child run per trial; at the end
    a results table is printed, and the best trial's whole config is written to
    STORAGE/NAME/best-config.yaml, ready for 'mlo-mae pretrain --config'.
    """
    ctx = click.get_current_context()
    if resume_name is not None:
        given = _given(ctx, ("resume_name", "storage_path", "address"))
        if given:
            raise InputError(f"--resume continues a study with its saved settings; drop {', '.join(given)}")
        _check_storage(storage_path)
        from training.study.runner import resume_study

        _print_study(resume_study(resume_name, storage_path, address, click.echo))
        return
    from tune_spaces.space import SpaceError, load_space

    try:
        space = load_space(space_name)
    except SpaceError as err:
        raise InputError(f"--space: {err}") from None
    flat = _flat_config(flags)
    searched = sorted(set(flat) & set(space.params))
    if searched:
        raise InputError(f"{searched[0]} is searched by {space.path}; drop it from the flags or from the space")
    base = config_mod.resolve(config_file, preset, {**space.fixed, **flat})
    _check_storage(storage_path)
    _check_dataset(base.data.dataset)
    uri, experiment = _tracking(tracking_uri, experiment)
    from training.study.runner import new_study
    from training.study.settings import StudyOptions, StudyTracking

    options = StudyOptions(num_samples=num_samples, workers_per_trial=workers_per_trial,
                           max_concurrent=max_concurrent, scheduler=scheduler, grace_period=grace_period,
                           reduction_factor=reduction_factor, search=search, search_seed=search_seed, metric=metric,
                           cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, placement=placement)
    _print_study(new_study(space, base, options, name or time.strftime("tune-%Y%m%d-%H%M%S"), storage_path,
                           address, StudyTracking(uri, experiment), click.echo, _warn))


def _print_study(outcome) -> None:
    from training.study.results import BEST_CONFIG, table

    settings, metric = outcome.settings, outcome.settings.metric
    header, body = table(outcome.rows, metric)
    click.echo(f"study '{settings.name}': {len(outcome.rows)} trial(s)")
    _echo_table(header, body)
    if outcome.best is None:
        raise RunFailed(f"no trial ran to its end with a {metric}; see the table above (the trials' output is in "
                        "the Ray logs, /tmp/ray/session_latest/logs)")
    best, uri = outcome.best, settings.mlflow.uri
    click.echo(f"best: trial {best.number}, {metric} {best.metric:.4f} (MLflow run {best.run_id}) | config: "
               f"{outcome.folder}/{BEST_CONFIG} (mlo-mae pretrain --config ...)")
    click.echo(f"compare the trials: 'mlflow ui --backend-store-uri {uri}', experiment "
               f"'{settings.mlflow.experiment}', run '{settings.name}'" if uri.startswith("sqlite")
               else f"compare the trials in MLflow at {uri}, run '{settings.name}'")


@cli.command()
@click.argument("source")
@click.argument("out")
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
def prepare(source: str, out: str, test_source: Path | None, seed: int, cifar_labels: str,
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
    the remaining 80%. OUT (a folder, or s3://bucket/prefix: see 'Running on
    a cluster' in the README) gets train/, val/, test/ and manifest.json.
    """
    from pipelines.location import check_reachable

    check_reachable(out, "OUT")
    from pipelines.catalog import progress_bar
    from pipelines.prepare import prepare as run_prepare

    started = time.perf_counter()
    manifest = run_prepare(source, out, test_source=test_source, seed=seed, cifar_labels=cifar_labels,
                           shard_mb=shard_size_mb, shard_rows=shard_rows, jobs=jobs, on_bad_image=on_bad_image,
                           progress=progress_bar, log=click.echo)
    counts, skipped = manifest["counts"], manifest["skipped"]
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped["by_reason"].items())
    if reasons and "all_in" in skipped:  # (older data sets list them in the manifest itself)
        reasons += f"; all listed in {out.rstrip('/')}/{skipped['all_in']}"
    click.echo(f"{out}: {len(manifest['classes'])} classes | train {counts['train']['total']}, "
               f"val {counts['val']['total']}, test {counts['test']['total']} | "
               f"{len(manifest['shards'])} shards | skipped {skipped['total']}"
               f"{f' ({reasons})' if reasons else ''} | {time.perf_counter() - started:.1f}s")
    if manifest["empty_classes"]:
        _warn(f"warning: class folders with no usable image: {', '.join(manifest['empty_classes'])}")


def _echo_logged(uri: str, run_id: str) -> None:
    from training.pretrain import logged_line

    click.echo(logged_line(uri, run_id))


def _check_source(source: str, tracking_uri: str | None) -> None:
    """SOURCE and an explicit --tracking-uri, checked before torch and MLflow load."""
    from training.pretrained import check_source

    check_source(source)
    if tracking_uri is not None:
        _tracking(tracking_uri, "")


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
    _check_source(source, tracking_uri)
    from training.downstream import run_probe

    started = time.perf_counter()
    evaluation, result = run_probe(source, dataset, device, tracking_uri, experiment, click.echo, _warn)
    for probe in (result, *result.others.values()):
        click.echo(f"linear probe of {probe.features} features: D_val top-1 {100 * probe.val_top1:.1f}% (L2 "
                   f"{probe.weight_decay:g} chosen on D_val) | test top-1 {100 * probe.test_top1:.1f}%")
    click.echo(f"probed in {time.perf_counter() - started:.1f}s")
    _echo_logged(evaluation.uri, evaluation.run_id)


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
    _check_source(source, tracking_uri)
    from mlo_mae.finetune import FinetuneConfig
    from training.downstream import run_finetune

    ft = FinetuneConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                        layer_decay=layer_decay, drop_path=drop_path, label_smoothing=label_smoothing, seed=seed)
    evaluation, result = run_finetune(source, dataset, device, tracking_uri, experiment, ft, batch_size,
                                      click.echo, _warn)
    click.echo(f"fine-tuned: D_val top-1 {100 * result.val_top1:.1f}% (epoch {result.best_epoch + 1} of {epochs}) "
               f"| test top-1 {100 * result.test_top1:.1f}%")
    _echo_logged(evaluation.uri, evaluation.run_id)


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

    uri = tracking.tracking_uri(tracking_uri)
    try:
        client = tracking.client(uri)
        exp = tracking.experiment_id(client, experiment, create=False)
        if exp is None:
            raise InputError(f"--experiment: no experiment '{experiment}' at {uri}")
        found = client.search_runs([exp], filter_string=f"tags.{tracking.KIND_TAG} = 'pretrain'",
                                   order_by=["attributes.start_time DESC"], max_results=max_results)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - MlflowException, connection errors
        raise InputError(f"--tracking-uri: cannot read {uri}: {' '.join(str(err).split())[:200]}") from None
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


def _fail(message: str, code: int) -> None:
    click.echo("mlo-mae: error: " + " ".join(message.split()), err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line per error, with the exit status of its kind (see ``mlo_mae.errors``)."""
    try:
        rv = cli.main(args=argv, prog_name="mlo-mae", standalone_mode=False)
    except click.ClickException as err:  # bad flag, value, option or command (a UsageError: exit 2)
        _fail(err.format_message(), err.exit_code)
    except (InputError, RunFailed) as err:
        _fail(str(err), err.exit_code)
    except Interrupted as err:
        click.echo(f"mlo-mae: {err}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("mlo-mae: interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()

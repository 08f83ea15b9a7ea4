"""The ``mlo-mae`` command.

Errors a user can fix (bad flags, config keys, presets, paths) print one line
``mlo-mae: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="mlo-mae", prog_name="mlo-mae")
def cli() -> None:
    """MLO-MAE: masked-autoencoder pretraining with a masking network learned by
    three-level optimisation for a downstream task."""


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML config file (sections model, mlo, optim, data, run); flags override it.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="Model and recipe preset [default: tiny, or the config file's].")
@click.option("--dataset", default=None,
              help=_help("'digits' (built in) or a folder written by 'mlo-mae prepare'.", "data.dataset"))
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Iterations to train (each: Stage-I x unroll, Stage II, Stage III); overrides --epochs.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=None,
              help=_help("Passes of Stage I over D_tr.", "run.epochs"))
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Batch size of every level [config: data.batch_mae/head/mask, default 32].")
@click.option("--seed", type=int, default=None, help=_help("Seed of initialisation and data order.", "run.seed"))
@click.option("--baseline/--mlo", default=None,
              help="Plain MAE (random masking, no Stage III) or MLO-MAE [config: mlo.baseline, default --mlo].")
@click.option("--mask-ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help=_help("Fraction of patches masked.", "mlo.mask_ratio"))
@click.option("--hypergradient", type=click.Choice(["fd", "exact"]), default=None,
              help=_help("fd: one finite difference; exact: double backward (small models).",
                         "mlo.hypergradient"))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help=_help("Where to train; auto picks CUDA when present.", "run.device"))
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help=_help("bf16 autocast (CUDA only) or fp32.", "run.precision"))
@click.option("--set", "-o", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. -o optim.lr_mask=3e-4 (repeatable).")
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Data-parallel Ray Train workers (each: its share of every batch) [default: 1].")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None,
              help="CPUs Ray reserves per worker [default: on CPU (cluster CPUs - 1) / workers, at least 0.5, "
                   "so that Ray Data keeps a CPU; on GPU 1, the rest decode].")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
              help="GPUs per worker [default: 1 if the device is cuda, or auto on a cluster with GPUs; else 0].")
@click.option("--address", envvar="RAY_ADDRESS", default=None,
              help="Join the Ray cluster at this address (e.g. auto, or ray://head:10001) "
                   "[default: $RAY_ADDRESS, else start a local cluster sized to this machine].")
@click.option("--storage-path", default="ray_results",
              help="Where runs keep checkpoints (Ray Train storage). Multi-node runs need storage every node "
                   "sees: NFS or s3://...")
@click.option("--name", default=None, help="Run name, a folder under --storage-path [default: pretrain-DATE-TIME].")
@click.option("--resume", "resume_name", default=None, metavar="NAME",
              help="Continue run NAME from its last checkpoint, with its saved config and workers.")
def pretrain(config_file: Path | None, preset: str | None, dataset: str | None, max_steps: int | None,
             epochs: float | None, batch_size: int | None, seed: int | None, baseline: bool | None,
             mask_ratio: float | None, hypergradient: str | None, device: str | None,
             precision: str | None, overrides: tuple[str, ...], print_config: bool, workers: int | None,
             cpus_per_worker: float | None, gpus_per_worker: float | None, address: str | None,
             storage_path: str, name: str | None, resume_name: str | None) -> None:
    """Pretrain E, D, C and T with MLO-MAE (or plain MAE with --baseline).

    With no arguments: the tiny preset on the built-in digits, a few minutes on
    2 CPU cores, then a linear probe of the encoder on the held-out test split.
    With --workers N, Ray Train runs N data-parallel workers (CPU or GPU, here
    or on the cluster at --address); checkpoints go to --storage-path/NAME and a
    run restarts from the last one by itself when a worker dies.
    """
    flat: dict[str, Any] = dict(config_mod.parse_override(o) for o in overrides)
    flags = {
        "data.dataset": dataset, "run.max_steps": max_steps, "run.epochs": epochs, "run.seed": seed,
        "mlo.baseline": baseline, "mlo.mask_ratio": mask_ratio, "mlo.hypergradient": hypergradient,
        "run.device": device, "run.precision": precision,
    }
    if batch_size is not None:
        flags.update({"data.batch_mae": batch_size, "data.batch_head": batch_size, "data.batch_mask": batch_size})
    flat.update({k: v for k, v in flags.items() if v is not None})
    if resume_name is not None:
        given = sorted(k for k in flat) + (["--config"] if config_file else []) + (["--preset"] if preset else [])
        if given or print_config or name:
            raise UserError(f"--resume continues a run with its saved settings; drop {', '.join(given) or '--name'}")
        _resume(resume_name, storage_path, workers, cpus_per_worker, gpus_per_worker, address)
        return
    cfg = config_mod.resolve(config_file, preset, flat)
    if print_config:
        click.echo(cfg.to_yaml(), nl=False)
        return
    from training.launch import Launch

    launch = Launch(name=name or time.strftime("pretrain-%Y%m%d-%H%M%S"), storage_path=storage_path,
                    workers=workers or 1, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                    address=address)
    _run_pretrain(cfg, launch, resume=False)


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
    _run_pretrain(cfg, launch, resume=True)


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


def _run_pretrain(cfg: config_mod.Config, launch, resume: bool) -> None:
    from mlo_mae.config import lr_scale
    from mlo_mae.engine import resolve_device
    from pipelines.streams import LEVELS
    from training.launch import TrainingError, TrainingInterrupted, run_pretrain
    from training.storage import read_run, storage_uri, write_run
    from training.worker import batch_size, total_iterations

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
    for level, (split, _) in LEVELS.items():
        batch = batch_size(cfg, level)
        if batch * n > data.count(split):
            raise UserError(f"data.batch_{level} ({batch}) x {n} worker(s) is larger than the {split} split "
                            f"({data.count(split)} images) of '{data.root}'")
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
    click.echo(f"run '{launch.name}' in {storage_uri(launch.storage_path)}"
               + (" (resuming from its last checkpoint)" if resume else ""))
    if not resume:
        write_run(launch.storage_path, launch.name, {"config": cfg.to_dict(), "dataset": str(data.root.resolve()),
                                                    "workers": n})
    try:
        metrics = run_pretrain(cfg, data, launch, click.echo)
    except TrainingInterrupted as stop:
        click.echo(f"interrupted; the checkpoints are kept: continue with 'mlo-mae pretrain --resume "
                   f"{launch.name}'" + (f" --storage-path {launch.storage_path}"
                                        if launch.storage_path != "ray_results" else ""), err=True)
        sys.exit(128 + stop.signum)
    except TrainingError as err:
        raise click.ClickException(str(err)) from None
    digests = metrics.get("replica_digests") or []
    if len(digests) > 1:
        same = "identical" if metrics.get("replicas_identical") else "DIFFERENT"
        click.echo(f"{len(digests)} replicas {same}: " + "; ".join(
            f"rank {r} " + ", ".join(f"{k} {v}" for k, v in d.items()) for r, d in enumerate(digests)))
    if "checkpoint" in metrics:
        click.echo(f"final checkpoint: {metrics['checkpoint']}")


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
    as ImageNet's train set), or CIFAR-10/100 'python' archives
    (cifar-10-python.tar.gz, cifar-100-python.tar.gz, or their extracted
    folders). Splits: test = the official one (CIFAR, --test-source) or 20%
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

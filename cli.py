"""The ``mlo-mae`` command.

Errors a user can fix (bad flags, config keys, presets, paths) print one line
``mlo-mae: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click

from mlo_mae import config as config_mod
from mlo_mae.config import ConfigError, PRESETS

DATASETS = ("digits",)
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
@click.option("--dataset", default=None, help=_help("Data set: 'digits' is built in.", "data.dataset"))
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
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for checkpoint.pt and config.yaml [default: no checkpoints].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help=_help("Where to train; auto picks CUDA when present.", "run.device"))
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help=_help("bf16 autocast (CUDA only) or fp32.", "run.precision"))
@click.option("--set", "-o", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. -o optim.lr_mask=3e-4 (repeatable).")
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
def pretrain(config_file: Path | None, preset: str | None, dataset: str | None, max_steps: int | None,
             epochs: float | None, batch_size: int | None, seed: int | None, baseline: bool | None,
             mask_ratio: float | None, hypergradient: str | None, output: Path | None, device: str | None,
             precision: str | None, overrides: tuple[str, ...], print_config: bool) -> None:
    """Pretrain E, D, C and T with MLO-MAE (or plain MAE with --baseline).

    With no arguments: the tiny preset on the built-in digits, a few minutes on
    2 CPU cores, then a linear probe of the encoder on the held-out test split.
    """
    flat: dict[str, Any] = dict(config_mod.parse_override(o) for o in overrides)
    flags = {
        "data.dataset": dataset, "run.max_steps": max_steps, "run.epochs": epochs, "run.seed": seed,
        "mlo.baseline": baseline, "mlo.mask_ratio": mask_ratio, "mlo.hypergradient": hypergradient,
        "run.output": str(output) if output is not None else None, "run.device": device,
        "run.precision": precision,
    }
    if batch_size is not None:
        flags.update({"data.batch_mae": batch_size, "data.batch_head": batch_size, "data.batch_mask": batch_size})
    flat.update({k: v for k, v in flags.items() if v is not None})
    cfg = config_mod.resolve(config_file, preset, flat)
    if print_config:
        click.echo(cfg.to_yaml(), nl=False)
        return
    _run_pretrain(cfg)


def _run_pretrain(cfg: config_mod.Config) -> None:
    from mlo_mae.checkpoint import save_atomic
    from mlo_mae.engine import MLOEngine, resolve_device
    from mlo_mae.loop import fit, format_progress
    from mlo_mae.probe import extract_features, linear_probe
    from pipelines.digits import load_digits_splits
    from pipelines.memory import EndlessLoader

    if cfg.data.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{cfg.data.dataset}' (built in: {', '.join(DATASETS)})")
    try:
        device = resolve_device(cfg.run.device)
    except ValueError as err:
        raise UserError(str(err)) from None
    if cfg.run.precision == "bf16" and device.type != "cuda":
        raise UserError("--precision bf16 needs a CUDA device; use fp32 on CPU")
    out = Path(cfg.run.output) if cfg.run.output else None
    if out is not None and (out / "checkpoint.pt").exists():
        raise UserError(f"'{out}' already holds a run (checkpoint.pt); choose another --output")

    data = load_digits_splits(cfg.model.img_size, cfg.data.split_seed)
    n_train = len(data.train[0])
    total = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * n_train / (cfg.data.batch_mae * cfg.mlo.unroll_mae)))
    d = cfg.data
    try:
        loaders = {
            "mae": EndlessLoader(*data.train, d.batch_mae, cfg.run.seed * 3 + 0, device),
            "head": EndlessLoader(*data.train, d.batch_head, cfg.run.seed * 3 + 1, device),
            "mask": EndlessLoader(*data.val, d.batch_mask, cfg.run.seed * 3 + 2, device),
        }
    except ValueError as err:
        raise UserError(str(err)) from None
    engine = MLOEngine(cfg, data.num_classes, total, device)
    mode = "baseline MAE (random masking)" if cfg.mlo.baseline else f"MLO-MAE ({cfg.mlo.hypergradient} hypergradient)"
    click.echo(f"{mode} | preset {cfg.preset} | {cfg.data.dataset}: D_tr {n_train}, D_val {len(data.val[0])}, "
               f"test {len(data.test[0])} | {total} iterations (unroll {cfg.mlo.unroll_mae}/"
               f"{cfg.mlo.unroll_head}/{cfg.mlo.unroll_mask}) | device {device}")

    def save() -> None:
        if out is None:
            return
        state = {"engine": engine.state_dict(), "data": {k: v.state_dict() for k, v in loaders.items()}}
        save_atomic(state, out / "checkpoint.pt")

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    try:
        fit(engine, loaders, cfg.run.log_every, lambda s, p: click.echo(format_progress(s, p)),
            cfg.run.checkpoint_every, save)
    except FloatingPointError as err:  # NaN/inf at some level: the last periodic checkpoint stays
        raise click.ClickException(f"training stopped: {err}") from None
    save()
    if out is not None:
        click.echo(f"checkpoint: {out / 'checkpoint.pt'}")
    if cfg.run.probe:
        feats = {name: (extract_features(engine.mae, x), y.cpu())
                 for name, (x, y) in {"train": data.train, "val": data.val, "test": data.test}.items()}
        result = linear_probe(feats["train"], feats["val"], feats["test"], data.num_classes)
        click.echo(f"linear probe (frozen encoder, L2 {result.weight_decay:g} chosen on D_val): "
                   f"D_val top-1 {100 * result.val_top1:.1f}% | test top-1 {100 * result.test_top1:.1f}%")


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

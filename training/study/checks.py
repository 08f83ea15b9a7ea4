"""Checks that run before a study starts, and how many trials run at once: pure functions of the
options, the space, the base config and the cluster's resources (no Ray calls)."""

from __future__ import annotations

import itertools
import math

from mlo_mae import config as config_mod
from tune_spaces.space import SearchSpace, SpaceError, check_values

from ..launch import DATA_CPUS, Launch, worker_resources
from mlo_mae.config import total_iterations
from .settings import StudyError, StudyOptions

# What a trial reports while it trains (ASHA can compare trials on it) or only at its end.
METRICS = {"val_top1": "max", "val_loss": "min"}
FINAL_METRICS = {"probe_val_top1": "max"}
LENGTH_KEYS = ("run.max_steps", "run.epochs", "data.batch_mae", "mlo.unroll_mae")  # set how long a trial runs
TRIAL_CPUS = 0.5  # what Tune reserves for a trial's driver function (it only waits on the TorchTrainer)


def metric_mode(metric: str) -> str:
    return {**METRICS, **FINAL_METRICS}[metric]


def check_options(options: StudyOptions, space: SearchSpace, base: config_mod.Config) -> None:
    """Options that cannot give a useful study, as one line naming the flag."""
    if options.metric not in METRICS and options.metric not in FINAL_METRICS:
        hint = " (the test split never selects a model)" if "test" in options.metric else ""
        raise StudyError(f"--metric {options.metric}: choose one of {', '.join([*METRICS, *FINAL_METRICS])}{hint}")
    if options.metric in FINAL_METRICS:
        if options.scheduler == "asha":
            raise StudyError(f"--metric {options.metric} is only known when a trial ends, so ASHA cannot compare "
                             "trials on it; use --scheduler fifo")
        if not base.run.probe and "run.probe" not in space.params:
            raise StudyError(f"--metric {options.metric} needs the end-of-run probe, which run.probe=false turns off")
    if options.scheduler == "asha" and "run.eval_every" in space.params:
        raise StudyError("--scheduler asha compares trials at the same iterations, so run.eval_every cannot be "
                         "searched (trials would be compared on evaluations of different ages); fix it or use "
                         "--scheduler fifo")
    if options.scheduler == "asha" and base.run.eval_every <= 0:
        raise StudyError("--scheduler asha compares trials on evaluations during training, and run.eval_every is 0; "
                         "set it (e.g. -o run.eval_every=25) or use --scheduler fifo")
    if options.search == "optuna":
        if options.metric in FINAL_METRICS:
            raise StudyError(f"--search optuna: Optuna reads the metric from every report a trial makes, and "
                             f"{options.metric} is only known when a trial ends; use --search random or --metric "
                             f"{', '.join(METRICS)}")
        grids = [key for key, p in space.params.items() if p.kind == "grid"]
        if grids:
            raise StudyError(f"--search optuna: '{grids[0]}' uses grid, which Optuna cannot sample; use choice")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise StudyError("--search optuna needs Optuna: pip install 'mlo-mae[optuna]' (or use --search "
                             "random)") from None


def check_space_on(space: SearchSpace, base: config_mod.Config) -> None:
    """Every bound and choice of the space must make a valid config on this study's base (the space file
    was checked on the defaults; ``-o model.embed_dim=...`` can still make a value invalid)."""
    try:
        check_values(space, base, f"{space.path}: ", "does not fit this study's config")
    except SpaceError as err:
        raise StudyError(str(err)) from None


def longest_trial(space: SearchSpace, base: config_mod.Config, train_rows: int) -> int:
    """The most iterations any trial of the space can run (ASHA's max_t): the longest of the configs
    made of the ends (or choices) of every searched key that sets a trial's length."""
    ends = {key: list(space.params[key].args) for key in LENGTH_KEYS if key in space.params}
    totals = [total_iterations(config_mod.with_overrides(base, dict(zip(ends, combo))), train_rows)
              for combo in itertools.product(*ends.values())]
    return max(totals)


def largest_batches(space: SearchSpace, base: config_mod.Config) -> config_mod.Config:
    """The base config with every searched batch size at its largest: what must fit the splits."""
    largest = {key: max(p.args) for key, p in space.params.items() if key.startswith("data.batch_")}
    return config_mod.with_overrides(base, largest)


def trial_launch(options: StudyOptions, concurrent: int) -> Launch:
    """How wide each trial's training is, with ``concurrent`` trials sharing the cluster."""
    return Launch(name="trial", workers=options.workers_per_trial, cpus_per_worker=options.cpus_per_worker,
                  gpus_per_worker=options.gpus_per_worker, concurrent=concurrent,
                  reserved_cpus=TRIAL_CPUS * concurrent)


def concurrency(options: StudyOptions, base: config_mod.Config, cluster: dict[str, float], trials: int) -> int:
    """Trials at once: ``--max-concurrent``, else what the cluster fits (trials on GPUs: their workers'
    GPUs; on CPUs: two CPUs a worker plus the trial's driver and a CPU for its Ray Data), at most the trials."""
    if options.max_concurrent:
        return min(options.max_concurrent, trials)
    workers = options.workers_per_trial
    per_worker = worker_resources(base, trial_launch(options, 1), cluster)
    if per_worker.get("GPU"):
        fits = cluster.get("GPU", 0) // (workers * per_worker["GPU"])
    else:
        fits = cluster.get("CPU", 1) // (2 * workers + TRIAL_CPUS + DATA_CPUS)
    return int(max(1, min(fits, trials)))


def check_fits(options: StudyOptions, base: config_mod.Config, cluster: dict[str, float], concurrent: int) -> None:
    """A study whose trials cannot all be placed would wait forever: say so instead."""
    per_worker = worker_resources(base, trial_launch(options, concurrent), cluster)
    workers = options.workers_per_trial
    cpus = concurrent * (TRIAL_CPUS + workers * per_worker["CPU"] + DATA_CPUS)
    gpus = concurrent * workers * per_worker.get("GPU", 0.0)
    if cpus > cluster.get("CPU", 0) or gpus > cluster.get("GPU", 0):
        raise StudyError(
            f"{concurrent} trial(s) at once with {workers} worker(s) each need {cpus:g} CPUs (each worker "
            f"{per_worker['CPU']:g}, each trial's driver {TRIAL_CPUS:g}, its Ray Data {DATA_CPUS:g})"
            + (f" and {gpus:g} GPUs" if gpus else "") + f"; the cluster has {cluster.get('CPU', 0):g} CPUs"
            + (f" and {cluster.get('GPU', 0):g} GPUs" if gpus else "")
            + ": lower --max-concurrent or --workers-per-trial")


def grace_period(options: StudyOptions, eval_every: int, max_t: int) -> int:
    """``--grace-period`` (default one evaluation interval) rounded up to an evaluation, so that every
    rung compares fresh evaluations; at most max_t."""
    grace = options.grace_period or eval_every
    return min(math.ceil(grace / eval_every) * eval_every, max_t)

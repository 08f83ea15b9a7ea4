"""The driver side of ``mlo-mae tune``: a Ray Tune study of pretrain trials, recorded in MLflow.

A study lives in ``STORAGE/NAME/``: Tune's experiment state (what ``--resume``
restores), ``mlo-mae-study.yaml`` (the settings), ``space.yaml`` (the space as it
was read), one folder per trial under ``trials/`` (each a pretrain run, see
``training.trial``), and at the end ``results.csv`` and ``best-config.yaml``.
In MLflow the study is a parent run (the space, the options, the best value as
trials finish, the results and the best config as artifacts) and each trial a
child run with everything a pretrain run records.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import ray.tune

from mlo_mae import config as config_mod
from tune_spaces.space import SearchSpace, SpaceError, check_values

from . import tracking
from .launch import DATA_CPUS, Launch, last_error_line, worker_resources
from .storage import filesystem, read_run, storage_uri, write_run
from .trial import STOPPED_EARLY_TAG, STUDY_TAG, TRIAL_CPUS, trial_config, trial_number
from .worker import total_iterations

STUDY_FILE = "mlo-mae-study.yaml"
SPACE_COPY = "space.yaml"
BEST_CONFIG = "best-config.yaml"
BEST_TRIAL_TAG = "mlo_mae.best_run"
ASHA_STATE = "asha-state.pkl"
# What a trial reports while it trains (ASHA can compare trials on it) or only at its end.
METRICS = {"val_top1": "max", "val_loss": "min"}
FINAL_METRICS = {"probe_val_top1": "max"}
LENGTH_KEYS = ("run.max_steps", "run.epochs", "data.batch_mae", "mlo.unroll_mae")  # set how long a trial runs


class StudyError(ValueError):
    """Study options or state that cannot work; one line for the user."""


@dataclass
class StudyOptions:
    """How the study searches; saved with it, so that ``--resume`` goes on the same way."""

    num_samples: int = 8
    workers_per_trial: int = 1
    max_concurrent: int | None = None  # None: what the cluster fits (see concurrency)
    scheduler: str = "asha"  # asha | fifo
    grace_period: int | None = None  # ASHA: iterations before a trial can be stopped; None: run.eval_every
    reduction_factor: int = 2  # ASHA: 1/reduction_factor of the trials go on at each rung
    search: str = "random"  # random | optuna
    search_seed: int = 0
    metric: str = "val_top1"
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None


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
        grids = [key for key, p in space.params.items() if p.kind == "grid"]
        if grids:
            raise StudyError(f"--search optuna: '{grids[0]}' uses grid, which Optuna cannot sample; use choice")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise StudyError("--search optuna needs Optuna: pip install 'mlo-mae[optuna]' (or use --search "
                             "random)") from None


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


def _launch(options: StudyOptions, concurrent: int) -> Launch:
    return Launch(name="trial", workers=options.workers_per_trial, cpus_per_worker=options.cpus_per_worker,
                  gpus_per_worker=options.gpus_per_worker, concurrent=concurrent,
                  reserved_cpus=TRIAL_CPUS * concurrent)


def concurrency(options: StudyOptions, base: config_mod.Config, cluster: dict[str, float], trials: int) -> int:
    """Trials at once: ``--max-concurrent``, else what the cluster fits (trials on GPUs: their workers'
    GPUs; on CPUs: two CPUs a worker plus the trial's driver and a CPU for its Ray Data), at most the trials."""
    if options.max_concurrent:
        return min(options.max_concurrent, trials)
    workers = options.workers_per_trial
    per_worker = worker_resources(base, _launch(options, 1), cluster)
    if per_worker.get("GPU"):
        fits = cluster.get("GPU", 0) // (workers * per_worker["GPU"])
    else:
        fits = cluster.get("CPU", 1) // (2 * workers + TRIAL_CPUS + DATA_CPUS)
    return int(max(1, min(fits, trials)))


def check_fits(options: StudyOptions, base: config_mod.Config, cluster: dict[str, float], concurrent: int) -> None:
    """A study whose trials cannot all be placed would wait forever: say so instead."""
    per_worker = worker_resources(base, _launch(options, concurrent), cluster)
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


def check_space_on(space: SearchSpace, base: config_mod.Config) -> None:
    """Every bound and choice of the space must make a valid config on this study's base (the space file
    was checked on the defaults; ``-o model.embed_dim=...`` can still make a value invalid)."""
    try:
        check_values(space, base, f"{space.path}: ", "does not fit this study's config")
    except SpaceError as err:
        raise StudyError(str(err)) from None


def describe(space: SearchSpace) -> dict[str, str]:
    """The space as MLflow params: ``space.KEY`` -> ``loguniform(1e-05, 0.001)``."""
    return {f"space.{k}": f"{p.kind}({', '.join(str(a) for a in p.args)})" for k, p in space.params.items()}


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class TrialRow:
    """One line of the results table."""

    number: str
    trial_id: str
    params: dict[str, Any]
    metric: float | None
    iteration: int | None
    total: int
    status: str  # finished | stopped early | failed | interrupted | pending
    run_id: str | None
    error: str = ""


def trial_outcome(status: str, iteration: int | None, total: int) -> str:
    if status == "ERROR":
        return "failed"
    if status == "TERMINATED":
        return "finished" if iteration is not None and iteration >= total else "stopped early"
    return "interrupted" if status in ("RUNNING", "PAUSED") else "pending"


class StudyMonitor(ray.tune.Callback):
    """Progress lines for the user, and the MLflow side of what Tune decides: the runs of trials that
    a scheduler stopped (their process was ended, not finished) and the study's best value so far.

    Pickled with the Tuner and restored with it, so it keeps no state beyond the placement groups it
    is about to remove.
    """

    def __init__(self, settings: dict[str, Any], echo: Callable[[str], None]) -> None:
        self.settings, self.echo = settings, echo

    def _total(self, trial) -> int:
        return total_iterations(trial_config(self.settings["base"], trial.config), self.settings["train_rows"])

    def _run_id(self, trial) -> str | None:
        saved = read_run(self.settings["trials_path"], trial.trial_id)
        return saved["mlflow"]["run_id"] if saved else None

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        params = ", ".join(f"{k}={format_value(v)}" for k, v in trial.config.items())
        self.echo(f"trial {trial_number(trial.trial_id)} started: {params}")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        metric = self.settings["options"]["metric"]
        if result.get("evaluated") and metric in result:
            self.echo(f"trial {trial_number(trial.trial_id)}: iteration {result['iteration']}/{self._total(trial)} | "
                      f"{metric} {result[metric]:.4f}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        metric, total = self.settings["options"]["metric"], self._total(trial)
        outcome = trial_outcome("TERMINATED", last.get("iteration"), total)
        value = f"{metric} {last[metric]:.4f}" if metric in last else f"no {metric}"
        self.echo(f"trial {trial_number(trial.trial_id)} {outcome} at iteration {last.get('iteration')}/{total}: "
                  f"{value}")
        self._release_later(trial)
        self._close(trial, "FINISHED", {STOPPED_EARLY_TAG: str(outcome == "stopped early").lower()})
        self._log_best(trials, trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.echo(f"trial {trial_number(trial.trial_id)} failed: {trial_error(trial)}")
        self._release_later(trial)
        self._close(trial, "FAILED", {})
        self._log_best(trials, trial, "ERROR")

    RELEASE_AFTER_S = 15.0  # Tune has ended the trial's process by then; earlier, Train would restart its workers

    def _release_later(self, trial) -> None:
        """A trial that Tune ended keeps its workers' placement group: Tune kills the trial's process, and Ray
        Train's cleaner, which should then remove the group, asks the dashboard's state API whether the
        controller is alive; without a dashboard (``ray[default]``) the group would hold its CPUs for good
        and the next trial would wait for them forever. A trial that reached its last iteration was seen
        to keep its group too (its process ended before Train removed it; the hang of a resumed study), so
        every ended trial's group is removed once its process is gone, unless Train removed it already."""
        group_id = (trial.last_result or {}).get("placement_group")
        if group_id:
            self.__dict__.setdefault("_to_release", []).append((time.monotonic() + self.RELEASE_AFTER_S, group_id))

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        from ray.util.placement_group import PlacementGroup, placement_group_table

        due = [g for t, g in self.__dict__.get("_to_release", []) if t <= time.monotonic()]
        if not due:
            return
        self._to_release = [(t, g) for t, g in self._to_release if g not in due]
        table = placement_group_table()
        for group_id in due:
            if table.get(group_id, {}).get("state") == "CREATED":
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))

    def _close(self, trial, status: str, tags: dict[str, str]) -> None:
        """End the trial's MLflow run as Tune ended the trial (the trial never ends it itself)."""
        uri, run_id = self.settings["mlflow"]["uri"], self._run_id(trial)
        if run_id is None:  # failed before its run was created
            return

        def close() -> None:
            client = tracking.client(uri)
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            client.set_terminated(run_id, status)

        self._guarded("ending a trial's run", close)

    def _log_best(self, trials: list, ended, status: str) -> None:
        """``best/METRIC`` over the trials that ran to the end (as ``best_row`` picks), by trials done.
        Tune calls back before it marks ``ended`` as ended, hence its ``status`` here."""
        metric = self.settings["options"]["metric"]
        statuses = {t.trial_id: status if t is ended else t.status for t in trials}
        done = [t for t in trials if statuses[t.trial_id] in ("TERMINATED", "ERROR")]
        values = [t.last_result[metric] for t in done if metric in (t.last_result or {}) and trial_outcome(
            statuses[t.trial_id], t.last_result.get("iteration"), self._total(t)) == "finished"]
        if values:
            best = (max if metric_mode(metric) == "max" else min)(values)
            uri, parent = self.settings["mlflow"]["uri"], self.settings["mlflow"]["run_id"]
            self._guarded("logging the best value", lambda: tracking.client(uri).log_metric(
                parent, f"best/{metric}", best, step=len(done)))

    def _guarded(self, what: str, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as err:  # noqa: BLE001 - the study goes on without this record
            self.echo(f"warning: MLflow: {what} failed: {' '.join(str(err).split())[:200]}")


def trial_error(trial) -> str:
    """The one line a failed trial's error comes down to (a ``TrialError``'s message as it is)."""
    text = None
    try:  # the local copy is there as soon as the trial fails; storage gets it later
        if trial.error_file and os.path.isfile(trial.error_file):
            with open(trial.error_file) as handle:
                text = handle.read()
        else:
            text = trial.get_error()
    except Exception:  # noqa: BLE001 - the error file may be gone
        pass
    if not text:
        return "failed (see error.txt in the trial's folder)"
    return re.sub(r"^([A-Za-z_]+\.)*TrialError: ", "", last_error_line(text))


def results(path: str, settings: dict[str, Any]) -> list[TrialRow]:
    """The table of every trial, read back from Tune's experiment state."""
    from ray.tune import ExperimentAnalysis

    metric = settings["options"]["metric"]
    analysis = ExperimentAnalysis(path, default_metric=metric, default_mode=metric_mode(metric))
    rows = []
    for trial in analysis.trials:  # in the order they were created
        last = trial.last_result or {}
        total = total_iterations(trial_config(settings["base"], trial.config), settings["train_rows"])
        saved = read_run(settings["trials_path"], trial.trial_id)
        rows.append(TrialRow(trial_number(trial.trial_id), trial.trial_id, dict(trial.config), last.get(metric),
                             last.get("iteration"), total, trial_outcome(trial.status, last.get("iteration"), total),
                             saved["mlflow"]["run_id"] if saved else None,
                             trial_error(trial) if trial.status == "ERROR" else ""))
    return rows


def best_row(rows: list[TrialRow], metric: str) -> TrialRow | None:
    """The best trial among those that ran to the end (a trial stopped early was behind at a rung)."""
    candidates = [r for r in rows if r.status == "finished" and r.metric is not None and not math.isnan(r.metric)]
    if not candidates:
        return None
    return (max if metric_mode(metric) == "max" else min)(candidates, key=lambda r: r.metric)


def table(rows: list[TrialRow], metric: str) -> tuple[list[str], list[list[str]]]:
    keys = list(rows[0].params) if rows else []
    header = ["trial", *keys, metric, "iterations", "status", "mlflow run"]
    body = [[r.number, *(format_value(r.params.get(k)) for k in keys),
             "-" if r.metric is None or r.status == "failed" else f"{r.metric:.4f}",
             f"{r.iteration if r.iteration is not None else 0}/{r.total}",
             r.status + (f": {r.error}" if r.error else ""), (r.run_id or "-")[:12]] for r in rows]
    return header, body


def results_csv(rows: list[TrialRow], metric: str) -> str:
    keys = list(rows[0].params) if rows else []
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial_id", *keys, metric, "iteration", "total_iterations", "status", "mlflow_run_id", "error"])
    for r in rows:
        writer.writerow([r.trial_id, *(r.params.get(k) for k in keys), r.metric, r.iteration, r.total, r.status,
                         r.run_id, r.error])
    return out.getvalue()


def best_config_yaml(row: TrialRow, settings: dict[str, Any]) -> str:
    """The best trial's whole config, as ``mlo-mae pretrain --config`` reads it."""
    cfg = trial_config(settings["base"], row.params)
    metric = settings["options"]["metric"]
    head = (f"# Best trial of study '{settings['name']}': trial {row.number} ({row.trial_id}), {metric} "
            f"{row.metric:.4f} at iteration {row.iteration}/{row.total}, MLflow run {row.run_id}.\n"
            f"# Train it: mlo-mae pretrain --config THIS_FILE\n")
    return head + cfg.to_yaml()


def write_text(folder: str, name: str, text: str) -> None:
    fs, root = filesystem(folder)
    with fs.open_output_stream(f"{root}/{name}") as handle:
        handle.write(text.encode())


class _DropReported(logging.Filter):
    """Tune logs a failed trial's whole traceback; the study prints its one line (the rest is in error.txt)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Trial task failed", "Trials did not complete"))


def quiet_tune() -> None:
    """Leave the terminal to the study's own lines: no banner, no tracebacks it already reports."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new engine prints its banner even at verbose=0
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).addFilter(_DropReported())
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass


def grace_period(options: StudyOptions, eval_every: int, max_t: int) -> int:
    """``--grace-period`` (default one evaluation interval) rounded up to an evaluation, so that every
    rung compares fresh evaluations; at most max_t."""
    grace = options.grace_period or eval_every
    return min(math.ceil(grace / eval_every) * eval_every, max_t)


def build_scheduler(options: StudyOptions, max_t: int, eval_every: int, state_uri: str):
    from ray.tune.schedulers import FIFOScheduler

    from .asha import KeptASHA

    if options.scheduler == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: a trial that reaches max_t still ends by itself (final checkpoint, probe)
    return KeptASHA(state_uri, time_attr="iteration", max_t=max_t, grace_period=grace_period(options, eval_every, max_t),
                    reduction_factor=options.reduction_factor, stop_last_trials=False)


def build_search(options: StudyOptions, concurrent: int):
    """The searcher, limited to ``concurrent`` trials at once (Tune's own limit skips a searcher it is given)."""
    if options.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=options.search_seed), max_concurrent=concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=options.search_seed, max_concurrent=concurrent)


def trainable(settings: dict[str, Any]):
    """The trial function with the study's settings bound and the resources each trial's driver holds."""
    from .trial import run_trial

    trial_settings = {k: settings[k] for k in ("name", "base", "dataset", "trials_path")}
    options = settings["options"]
    trial_settings.update(workers=options["workers_per_trial"], cpus_per_worker=options["cpus_per_worker"],
                          gpus_per_worker=options["gpus_per_worker"], concurrent=settings["concurrent"],
                          tracking_uri=settings["mlflow"]["uri"], experiment=settings["mlflow"]["experiment"],
                          parent_run_id=settings["mlflow"]["run_id"])
    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, study=trial_settings), {"CPU": TRIAL_CPUS})


def new_tuner(space: SearchSpace, settings: dict[str, Any], max_t: int, echo: Callable[[str], None]):
    options = StudyOptions(**settings["options"])
    base = config_mod.from_dict(settings["base"])
    return ray.tune.Tuner(
        trainable(settings),
        param_space=space.to_tune(),
        tune_config=ray.tune.TuneConfig(
            metric=options.metric, mode=metric_mode(options.metric), num_samples=options.num_samples,
            search_alg=build_search(options, settings["concurrent"]),
            scheduler=build_scheduler(options, max_t, base.run.eval_every,
                                      f"{settings['storage']}/{settings['name']}/{ASHA_STATE}"),
            trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=ray.tune.RunConfig(
            name=settings["name"], storage_path=settings["storage"], verbose=0,
            callbacks=[StudyMonitor(settings, echo)],
            failure_config=ray.tune.FailureConfig(max_failures=0)),  # a failing trial fails; Train retries workers
    )


def has_state(folder: str) -> bool:
    """Whether Tune saved the study's state (it does once the study has started)."""
    return ray.tune.Tuner.can_restore(folder)


class StudyInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: Tune stopped the trials and saved its state for ``--resume``."""

    def __init__(self, signum: int) -> None:
        super().__init__("interrupted")
        self.signum = signum


def fit(tuner, expected_trials: int, path: str) -> None:
    """Run the Tuner to the end. On Ctrl-C Tune stops the running trials, saves its state and returns;
    SIGTERM (schedulers, ``kill``) is turned into the same. Either way this raises ``StudyInterrupted``."""
    from ray.tune import ExperimentAnalysis

    terminated: list[int] = []

    def on_term(signum, _frame) -> None:  # after ray.init, whose own SIGTERM handler crashes the driver
        terminated.append(signum)
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background process inherits it ignored
    try:
        tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C, or one before Tune's handler is in place
        raise StudyInterrupted(signal.SIGINT) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    trials = ExperimentAnalysis(path).trials
    if terminated or sum(t.status in ("TERMINATED", "ERROR") for t in trials) < expected_trials:
        raise StudyInterrupted(signal.SIGTERM if terminated else signal.SIGINT)


def study_settings(name: str, storage: str, base: config_mod.Config, dataset: str,
                   train_rows: int, options: StudyOptions, concurrent: int, mlflow: dict[str, str]) -> dict[str, Any]:
    """What the study saves in ``mlo-mae-study.yaml``: all that ``--resume`` and the trials need."""
    return {"name": name, "storage": storage_uri(storage), "base": base.to_dict(), "dataset": dataset,
            "train_rows": train_rows, "options": asdict(options), "concurrent": concurrent,
            "trials_path": f"{storage_uri(storage)}/{name}/trials", "mlflow": mlflow}


def expected_trials(settings: dict[str, Any], space: SearchSpace) -> int:
    """Samples times the grid (Tune repeats every grid point in each sample); Optuna has no grid."""
    return settings["options"]["num_samples"] * space.grid_size


def start(settings: dict[str, Any], space: SearchSpace, base: config_mod.Config) -> str:
    """The study's MLflow parent run and its folder with the settings; returns the parent's run id."""
    mlflow, options = settings["mlflow"], settings["options"]
    params = {**describe(space), **{f"tune.{k}": v for k, v in options.items()},
              "tune.concurrent": settings["concurrent"], "tune.trials": expected_trials(settings, space)}
    run_id = tracking.start_run(mlflow["uri"], mlflow["experiment"], settings["name"], "tune", base, params,
                                {STUDY_TAG: settings["name"]})
    settings["mlflow"]["run_id"] = run_id
    write_run(settings["storage"], settings["name"], settings, STUDY_FILE)
    text = space.path.read_text()
    write_text(f"{settings['storage']}/{settings['name']}", SPACE_COPY, text)
    tracking.call("recording the space", mlflow["uri"], lambda: tracking.client(mlflow["uri"]).log_text(
        run_id, text, SPACE_COPY))
    return run_id


def read_settings(storage: str, name: str) -> dict[str, Any] | None:
    return read_run(storage, name, STUDY_FILE)


@dataclass
class StudyOutcome:
    rows: list[TrialRow]
    best: TrialRow | None
    folder: str  # where results.csv and best-config.yaml are


def run(settings: dict[str, Any], space: SearchSpace, echo: Callable[[str], None], resume: bool = False) -> StudyOutcome:
    """Run (or continue) the study to its end and record the outcome. ``StudyInterrupted`` on Ctrl-C or
    SIGTERM, ``StudyError`` (one line) on anything else; either way no MLflow run is left RUNNING."""
    folder = f"{settings['storage']}/{settings['name']}"
    uri, parent = settings["mlflow"]["uri"], settings["mlflow"]["run_id"]
    quiet_tune()
    if settings["options"]["metric"] in FINAL_METRICS:  # in the last report only; Tune would reject the others
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if resume and has_state(folder):  # finished trials stay, interrupted ones go on, the rest start
        tuner = ray.tune.Tuner.restore(folder, trainable(settings), resume_unfinished=True, resume_errored=False)
    else:  # a new study, or one stopped before Tune saved anything: start it (again)
        base = config_mod.from_dict(settings["base"])
        tuner = new_tuner(space, settings, longest_trial(space, base, settings["train_rows"]), echo)
    if resume:
        tracking.reopen_run(uri, parent)
    try:
        fit(tuner, expected_trials(settings, space), folder)
        return conclude(settings, folder)
    except StudyInterrupted:
        end_runs(settings, folder, "KILLED", echo)
        raise
    except Exception as err:  # a Tune or MLflow failure: one line, and the runs end FAILED
        end_runs(settings, folder, "FAILED", echo)
        raise StudyError(f"the study failed: {last_error_line(err)}") from None


def end_runs(settings: dict[str, Any], folder: str, status: str, echo: Callable[[str], None]) -> None:
    """End the parent run with ``status`` and every trial's run still RUNNING as its trial ended (or
    ``status`` for trials that had not); ``--resume`` reopens them."""
    uri = settings["mlflow"]["uri"]
    ended = {"finished": "FINISHED", "stopped early": "FINISHED", "failed": "FAILED"}
    try:
        rows = results(folder, settings) if has_state(folder) else []
        client = tracking.client(uri)
        for row in rows:
            if row.run_id and client.get_run(row.run_id).info.status == "RUNNING":
                tracking.end_run(uri, row.run_id, ended.get(row.status, status), echo)
    except Exception as err:  # noqa: BLE001 - still end the parent
        echo(f"warning: could not end the trials' MLflow runs: {last_error_line(err)}")
    tracking.end_run(uri, settings["mlflow"]["run_id"], status, echo)


def conclude(settings: dict[str, Any], folder: str) -> StudyOutcome:
    """The results table and best config, in the study folder and on the parent run."""
    metric = settings["options"]["metric"]
    rows = results(folder, settings)
    best = best_row(rows, metric)
    uri, parent = settings["mlflow"]["uri"], settings["mlflow"]["run_id"]
    table_csv = results_csv(rows, metric)
    write_text(folder, "results.csv", table_csv)
    best_text = best_config_yaml(best, settings) if best is not None else None
    if best_text is not None:
        write_text(folder, BEST_CONFIG, best_text)

    def record() -> None:
        client = tracking.client(uri)
        client.log_text(parent, table_csv, "results.csv")
        if best is not None:
            client.log_text(parent, best_text, BEST_CONFIG)
            client.log_metric(parent, f"best/{metric}", best.metric, step=len(rows))
            client.set_tag(parent, BEST_TRIAL_TAG, best.run_id or best.trial_id)
        for key, count in (("finished", "trials/finished"), ("stopped early", "trials/stopped_early"),
                           ("failed", "trials/failed")):
            client.log_metric(parent, count, sum(r.status == key for r in rows))

    tracking.call("recording the study's results", uri, record)
    tracking.end_run(uri, parent, "FINISHED" if best is not None else "FAILED")
    return StudyOutcome(rows, best, folder)

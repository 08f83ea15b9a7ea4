"""Running a study: start it (checks, the MLflow parent run, the study folder), fit the Tuner, resume it,
and record its outcome. ``new_study`` and ``resume_study`` are ``mlo-mae tune``'s two ways in."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import ray.tune

from mlo_mae import config as config_mod
from mlo_mae.errors import InputError, Interrupted, RunFailed
from pipelines.catalog import open_dataset
from tune_spaces.space import SearchSpace, load_space

from .. import tracking
from ..launch import batch_problem, connect, last_error_line, warn_local_store
from ..signals import last_signal, sigterm_as_sigint
from ..storage import resume_hint, storage_uri
from . import checks
from .results import BEST_CONFIG, TrialRow, best_config_yaml, best_row, results, results_csv, write_text
from .settings import SPACE_COPY, StudyError, StudyOptions, StudySettings, StudyTracking, TrialSpec
from .trial import STUDY_TAG

BEST_TRIAL_TAG = "mlo_mae.best_run"
ASHA_STATE = "asha-state.pkl"
Echo = Callable[[str], None]


@dataclass
class StudyOutcome:
    settings: StudySettings
    rows: list[TrialRow]
    best: TrialRow | None
    folder: str  # where results.csv and best-config.yaml are


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


def build_scheduler(options: StudyOptions, max_t: int, eval_every: int, state_uri: str):
    from ray.tune.schedulers import FIFOScheduler

    from .asha import KeptASHA

    if options.scheduler == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: a trial that reaches max_t still ends by itself (final checkpoint, probe)
    return KeptASHA(state_uri, time_attr="iteration", max_t=max_t,
                    grace_period=checks.grace_period(options, eval_every, max_t),
                    reduction_factor=options.reduction_factor, stop_last_trials=False)


def build_search(options: StudyOptions, concurrent: int):
    """The searcher, limited to ``concurrent`` trials at once (Tune's own limit skips a searcher it is given)."""
    if options.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=options.search_seed), max_concurrent=concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=options.search_seed, max_concurrent=concurrent)


def trainable(settings: StudySettings):
    """The trial function with the study's settings bound and the resources each trial's driver holds."""
    from .trial import run_trial

    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, spec=TrialSpec.of(settings)),
                                   {"CPU": checks.TRIAL_CPUS})


def new_tuner(space: SearchSpace, settings: StudySettings, echo: Echo):
    from .monitor import StudyMonitor

    options = settings.options
    max_t = checks.longest_trial(space, settings.base, settings.train_rows)
    return ray.tune.Tuner(
        trainable(settings),
        param_space=space.to_tune(),
        tune_config=ray.tune.TuneConfig(
            metric=options.metric, mode=checks.metric_mode(options.metric), num_samples=options.num_samples,
            search_alg=build_search(options, settings.concurrent),
            scheduler=build_scheduler(options, max_t, settings.base.run.eval_every,
                                      f"{settings.folder}/{ASHA_STATE}"),
            trial_dirname_creator=lambda trial: trial.trial_id,
            reuse_actors=True),  # a trial's driver imports torch, Ray Train and MLflow: ~8 s each, paid once
        run_config=ray.tune.RunConfig(
            name=settings.name, storage_path=settings.storage, verbose=0,
            callbacks=[StudyMonitor(settings, echo)],
            failure_config=ray.tune.FailureConfig(max_failures=0)),  # a failing trial fails; Train retries workers
    )


def has_state(folder: str) -> bool:
    """Whether Tune saved the study's state (it does once the study has started)."""
    return ray.tune.Tuner.can_restore(folder)


def expected_trials(settings: StudySettings, space: SearchSpace) -> int:
    """Samples times the grid (Tune repeats every grid point in each sample); Optuna has no grid."""
    return settings.options.num_samples * space.grid_size


def _interrupted(settings: StudySettings, signum: int) -> Interrupted:
    return Interrupted("interrupted; the finished trials and the checkpoints are kept: "
                       + resume_hint("tune", settings.name, settings.storage), signum)


def fit(tuner, settings: StudySettings, expected: int) -> None:
    """Run the Tuner to the end. On Ctrl-C (or SIGTERM, turned into it) Tune stops the running trials, saves
    its state and returns; either way this raises ``Interrupted``."""
    from ray.tune import ExperimentAnalysis

    with sigterm_as_sigint() as received:
        try:
            tuner.fit()
        except KeyboardInterrupt:  # a second Ctrl-C, or one before Tune's handler is in place
            raise _interrupted(settings, last_signal(received)) from None
    trials = ExperimentAnalysis(settings.folder).trials
    if received or sum(t.status in ("TERMINATED", "ERROR") for t in trials) < expected:
        raise _interrupted(settings, last_signal(received))


def describe(space: SearchSpace) -> dict[str, str]:
    """The space as MLflow params: ``space.KEY`` -> ``loguniform(1e-05, 0.001)``."""
    return {f"space.{k}": f"{p.kind}({', '.join(str(a) for a in p.args)})" for k, p in space.params.items()}


def start(settings: StudySettings, space: SearchSpace) -> None:
    """The study's MLflow parent run and its folder with the settings and the space."""
    mlflow, options = settings.mlflow, settings.options
    params = {**describe(space), **{f"tune.{k}": v for k, v in vars(options).items()},
              "tune.concurrent": settings.concurrent, "tune.trials": expected_trials(settings, space)}
    mlflow.run_id = tracking.start_run(mlflow.uri, mlflow.experiment, settings.name, "tune", settings.base, params,
                                       {STUDY_TAG: settings.name})
    settings.save()
    text = space.path.read_text()
    write_text(settings.folder, SPACE_COPY, text)
    tracking.call("recording the space", mlflow.uri, lambda: tracking.client(mlflow.uri).log_text(
        mlflow.run_id, text, SPACE_COPY))


def run(settings: StudySettings, space: SearchSpace, echo: Echo, resume: bool = False) -> StudyOutcome:
    """Run (or continue) the study to its end and record the outcome. ``Interrupted`` on Ctrl-C or SIGTERM,
    ``RunFailed`` (one line) on anything else; either way no MLflow run is left RUNNING."""
    quiet_tune()
    if settings.metric in checks.FINAL_METRICS:  # in the last report only; Tune would reject the others
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if resume and has_state(settings.folder):  # finished trials stay, interrupted ones go on, the rest start
        tuner = ray.tune.Tuner.restore(settings.folder, trainable(settings), resume_unfinished=True,
                                       resume_errored=False)
    else:  # a new study, or one stopped before Tune saved anything: start it (again)
        tuner = new_tuner(space, settings, echo)
    if resume:
        tracking.reopen_run(settings.mlflow.uri, settings.mlflow.run_id)
    try:
        fit(tuner, settings, expected_trials(settings, space))
        return conclude(settings)
    except Interrupted:
        end_runs(settings, "KILLED", echo)
        raise
    except Exception as err:  # a Tune or MLflow failure: one line, and the runs end FAILED
        end_runs(settings, "FAILED", echo)
        raise RunFailed(f"the study failed: {last_error_line(err)}") from None
    finally:
        release_trial_groups(settings, echo)


def release_trial_groups(settings: StudySettings, echo: Echo) -> None:
    """Every trial has ended once the Tuner returns: remove the workers' placement groups that Ray Train
    left (see ``StudyMonitor``). A driver that goes on (a notebook, the tests) would otherwise keep their
    CPUs reserved, and its next run would wait for them forever; an exiting one loses them anyway."""
    from ray.tune import ExperimentAnalysis

    from .monitor import release_groups

    try:
        trials = ExperimentAnalysis(settings.folder).trials if has_state(settings.folder) else []
        release_groups([g for t in trials if (g := (t.last_result or {}).get("placement_group"))])
    except Exception as err:  # noqa: BLE001 - the study's outcome stands
        echo(f"warning: could not release the trials' placement groups: {last_error_line(err)}")


def end_runs(settings: StudySettings, status: str, echo: Echo) -> None:
    """End the parent run with ``status`` and every trial's run still RUNNING as its trial ended (or
    ``status`` for trials that had not); ``--resume`` reopens them."""
    uri = settings.mlflow.uri
    ended = {"finished": "FINISHED", "stopped early": "FINISHED", "failed": "FAILED"}
    try:
        rows = results(settings) if has_state(settings.folder) else []
        client = tracking.client(uri)
        for row in rows:
            if row.run_id and client.get_run(row.run_id).info.status == "RUNNING":
                tracking.end_run(uri, row.run_id, ended.get(row.status, status), echo)
    except Exception as err:  # noqa: BLE001 - still end the parent
        echo(f"warning: could not end the trials' MLflow runs: {last_error_line(err)}")
    tracking.end_run(uri, settings.mlflow.run_id, status, echo)


def conclude(settings: StudySettings) -> StudyOutcome:
    """The results table and best config, in the study folder and on the parent run."""
    metric, folder = settings.metric, settings.folder
    rows = results(settings)
    best = best_row(rows, metric)
    uri, parent = settings.mlflow.uri, settings.mlflow.run_id
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
    return StudyOutcome(settings, rows, best, folder)


def _cluster(address: str | None) -> dict[str, float]:
    connect(address)
    return ray.cluster_resources()


def new_study(space: SearchSpace, base: config_mod.Config, options: StudyOptions, name: str, storage_path: str,
              address: str | None, mlflow: StudyTracking, echo: Echo, warn: Echo) -> StudyOutcome:
    """``mlo-mae tune``: check everything that can be checked, then start the study and run it to its end."""
    checks.check_options(options, space, base)
    checks.check_space_on(space, base)
    if StudySettings.read(storage_path, name) is not None:
        raise StudyError(f"--name: study '{name}' already exists in '{storage_uri(storage_path)}'; continue it "
                         f"with --resume {name} or choose another name")
    data = open_dataset(base.data.dataset, echo)
    problem = batch_problem(checks.largest_batches(space, base), data, options.workers_per_trial)
    if problem:
        raise StudyError(problem + (f" (the largest batch of {space.path})"
                                    if any(k.startswith("data.batch_") for k in space.params) else ""))
    try:
        tracking.check_store(mlflow.uri)
    except tracking.TrackingError as err:
        raise InputError(f"--tracking-uri: {err}") from None
    cluster = _cluster(address)
    warn_local_store(mlflow.uri, warn)
    trials = options.num_samples * space.grid_size
    concurrent = checks.concurrency(options, base, cluster, trials)
    checks.check_fits(options, base, cluster, concurrent)
    settings = StudySettings.new(name, storage_path, base, data.root, data.count("train"), options,
                                 concurrent, mlflow)
    try:
        start(settings, space)
    except tracking.TrackingError as err:
        raise InputError(f"--tracking-uri: {err}") from None
    max_t = checks.longest_trial(space, base, data.count("train"))
    asha = (f"ASHA on {options.metric} (grace {checks.grace_period(options, base.run.eval_every, max_t)}, "
            f"reduction {options.reduction_factor}, up to {max_t} iterations)" if options.scheduler == "asha"
            else "FIFO (every trial to its end)")
    echo(f"study '{name}': {trials} trial(s) of {space.path} ({', '.join(space.params)}) | {asha} | "
         f"{options.search} search, seed {options.search_seed} | {concurrent} at once, "
         f"{options.workers_per_trial} worker(s) each | {data.manifest['name']}, preset {base.preset}")
    echo(f"MLflow parent run {mlflow.run_id} (experiment '{mlflow.experiment}') at {mlflow.uri}; trials in "
         f"{settings.trials_path}")
    return run(settings, space, echo, resume=False)


def resume_study(name: str, storage_path: str, address: str | None, echo: Echo) -> StudyOutcome:
    """``mlo-mae tune --resume NAME``: unfinished trials go on from their checkpoints, then new ones start."""
    settings = StudySettings.read(storage_path, name)
    if settings is None:
        raise StudyError(f"--resume: no study '{name}' in '{storage_uri(storage_path)}' (see --storage-path)")
    space = load_space(f"{settings.folder}/{SPACE_COPY}")
    _cluster(address)
    echo(f"study '{name}': resuming ({expected_trials(settings, space)} trial(s) in all)")
    return run(settings, space, echo, resume=True)

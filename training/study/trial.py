"""One trial of a study: a whole pretrain run with the sampled settings, as a Ray Tune function trainable.

Ray Train V2 runs under Tune as a function that builds and fits the
TorchTrainer; ``TuneReportCallback`` forwards rank 0's reports (each carries the
last evaluation) to Tune, whose scheduler may stop the trial. A trial is an
ordinary pretrain run: its checkpoints and ``mlo-mae-run.yaml`` live in
``STORAGE/STUDY/trials/TRIAL_ID`` and it has its own MLflow run, a child of the
study's, so ``mlo-mae probe RUN_ID`` and ``finetune`` work on it. A restarted
trial (``mlo-mae tune --resume``) continues from its last checkpoint and logs
to the same MLflow run, which the study driver ends (``training.study.StudyMonitor``).
"""

from __future__ import annotations

from typing import Any

from mlo_mae import config as config_mod

from . import tracking
from .launch import Launch, TrainingError, batch_problem, run_params, run_pretrain
from .storage import read_run, write_run

STUDY_TAG = "mlo_mae.study"  # the study's name, on its parent run and on every trial's run
TRIAL_TAG = "mlo_mae.trial_id"
STOPPED_EARLY_TAG = "mlo_mae.stopped_early"
TRIAL_CPUS = 0.5  # what Tune reserves for a trial's driver function (it only waits on the TorchTrainer)


class TrialError(RuntimeError):
    """A trial that cannot run or failed; Tune records it and the study goes on. One line."""


def trial_number(trial_id: str) -> str:
    """Tune's trial ids are ``<experiment>_<counter>``; the counter names a trial for people."""
    return trial_id.rsplit("_", 1)[-1]


def trial_config(base: dict[str, Any], sample: dict[str, Any]) -> config_mod.Config:
    """The study's base config with one trial's sampled values (dotted keys)."""
    return config_mod.with_overrides(config_mod.from_dict(base), sample, f"trial {sample}: ")


def run_trial(sample: dict[str, Any], study: dict[str, Any]) -> None:
    """Train one trial to its end (or until Tune stops it). ``study``: see ``training.study.trial_settings``."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.manifest import load_prepared

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(study["base"], sample)
    data = load_prepared(study["dataset"])
    workers = study["workers"]
    problem = batch_problem(cfg, data, workers)
    if problem:
        raise TrialError(problem)
    runs, uri = study["trials_path"], study["tracking_uri"]
    saved = read_run(runs, trial_id)
    if saved is not None:  # restarted by --resume: the same MLflow run goes on
        run_id = saved["mlflow"]["run_id"]
        tracking.reopen_run(uri, run_id)
    else:
        tags = {tracking.RUN_DIR_TAG: f"{runs}/{trial_id}", STUDY_TAG: study["name"], TRIAL_TAG: trial_id}
        run_id = tracking.start_run(uri, study["experiment"], f"{study['name']}-{trial_number(trial_id)}", "pretrain",
                                    cfg, run_params(cfg, data, workers), tags, parent=study["parent_run_id"])
        write_run(runs, trial_id, {"config": cfg.to_dict(), "dataset": study["dataset"], "workers": workers,
                                   "mlflow": {"uri": uri, "experiment": study["experiment"], "run_id": run_id}})
    launch = Launch(name=trial_id, storage_path=runs, workers=workers, cpus_per_worker=study["cpus_per_worker"],
                    gpus_per_worker=study["gpus_per_worker"], concurrent=study["concurrent"],
                    reserved_cpus=TRIAL_CPUS * study["concurrent"])
    try:
        metrics = run_pretrain(cfg, data, launch, print, {"uri": uri, "run_id": run_id}, [TuneReportCallback()])
    except TrainingError as err:
        raise TrialError(str(err)) from None
    if "checkpoint" in metrics:
        try:
            tracking.record_checkpoint(uri, run_id, metrics["checkpoint"], f"{runs}/{trial_id}", trial_id)
        except tracking.TrackingError as err:
            print(f"warning: {err}")
    # The run's status is the study driver's to set: only it knows whether Tune finished, stopped or
    # failed the trial (a trial being stopped can see its TorchTrainer vanish and fail here first).

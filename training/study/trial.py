"""One trial of a study: a whole pretrain run with the sampled settings, as a Ray Tune function trainable.

Ray Train V2 runs under Tune as a function that builds and fits the
TorchTrainer; ``TuneReportCallback`` forwards rank 0's reports (each carries the
last evaluation) to Tune, whose scheduler may stop the trial. A trial is an
ordinary pretrain run (``training.pretrain``): its checkpoints and
``mlo-mae-run.yaml`` live in ``STORAGE/STUDY/trials/TRIAL_ID`` and it has its own
MLflow run, a child of the study's, so ``mlo-mae probe RUN_ID`` and ``finetune``
work on it. A restarted trial (``mlo-mae tune --resume``) continues from its last
checkpoint and logs to the same MLflow run, which the study driver ends
(``training.study.monitor``).
"""

from __future__ import annotations

from typing import Any

from mlo_mae.errors import InputError, RunFailed
from pipelines.manifest import load_prepared

from ..launch import Launch
from ..pretrain import RunIdentity, RunTracking, pretrain
from ..storage import read_run
from .settings import TrialSpec, trial_config, trial_number

STUDY_TAG = "mlo_mae.study"  # the study's name, on its parent run and on every trial's run
TRIAL_TAG = "mlo_mae.trial_id"
STOPPED_EARLY_TAG = "mlo_mae.stopped_early"


class TrialError(RuntimeError):
    """A trial that cannot run or failed; Tune records it and the study goes on. One line."""


def run_trial(sample: dict[str, Any], spec: TrialSpec) -> None:
    """Train one trial to its end (or until Tune stops it)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .checks import TRIAL_CPUS

    trial_id = ray.tune.get_context().get_trial_id()
    saved = read_run(spec.trials_path, trial_id)  # restarted by --resume: the same MLflow run goes on
    run = RunTracking.saved(saved["mlflow"]) if saved else RunTracking(spec.tracking_uri, spec.experiment)
    identity = RunIdentity(name=f"{spec.study}-{trial_number(trial_id)}", parent_run_id=spec.parent_run_id,
                           tags={STUDY_TAG: spec.study, TRIAL_TAG: trial_id})
    launch = Launch(name=trial_id, storage_path=spec.trials_path, workers=spec.workers,
                    cpus_per_worker=spec.cpus_per_worker, gpus_per_worker=spec.gpus_per_worker,
                    placement=spec.placement, concurrent=spec.concurrent, reserved_cpus=TRIAL_CPUS * spec.concurrent)
    try:
        # The run's status is the study driver's to set: only it knows whether Tune finished, stopped or
        # failed the trial (a trial being stopped can see its TorchTrainer vanish and fail here first).
        pretrain(trial_config(spec.base, sample), launch, run, print, print, resume=saved is not None,
                 data=load_prepared(spec.dataset), identity=identity, callbacks=[TuneReportCallback()],
                 end_run=False)
    except (InputError, RunFailed) as err:
        raise TrialError(str(err)) from None

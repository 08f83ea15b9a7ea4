"""What a study is: its options, its saved settings and what each trial is given, as typed records.

``StudySettings`` is saved as ``STORAGE/NAME/mlo-mae-study.yaml`` (all that
``--resume`` needs); ``TrialSpec`` is bound to every trial's function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from mlo_mae import config as config_mod
from mlo_mae.errors import InputError

from ..storage import read_run, storage_uri, write_run

STUDY_FILE = "mlo-mae-study.yaml"
SPACE_COPY = "space.yaml"


class StudyError(InputError):
    """Study options or state that cannot work; one line for the user."""


@dataclass
class StudyOptions:
    """How the study searches; saved with it, so that ``--resume`` goes on the same way."""

    num_samples: int = 8
    workers_per_trial: int = 1
    max_concurrent: int | None = None  # None: what the cluster fits (see checks.concurrency)
    scheduler: str = "asha"  # asha | fifo
    grace_period: int | None = None  # ASHA: iterations before a trial can be stopped; None: run.eval_every
    reduction_factor: int = 2  # ASHA: 1/reduction_factor of the trials go on at each rung
    search: str = "random"  # random | optuna
    search_seed: int = 0
    metric: str = "val_top1"
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    placement: str = "pack"  # of each trial's workers (see Launch)


@dataclass
class StudyTracking:
    """The study's MLflow parent run (``run_id`` is set once it is created)."""

    uri: str
    experiment: str
    run_id: str | None = None


@dataclass
class StudySettings:
    """A study as saved: everything ``--resume`` and the trials need."""

    name: str
    storage: str  # absolute path or URI
    base: config_mod.Config  # what the trials' sampled values change
    dataset: str  # the prepared folder, absolute
    train_rows: int
    options: StudyOptions
    concurrent: int  # trials at once
    mlflow: StudyTracking

    @property
    def folder(self) -> str:
        return f"{self.storage}/{self.name}"

    @property
    def trials_path(self) -> str:
        """Where each trial's run folder is (``trials/TRIAL_ID``)."""
        return f"{self.folder}/trials"

    @property
    def metric(self) -> str:
        return self.options.metric

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "storage": self.storage, "base": self.base.to_dict(), "dataset": self.dataset,
                "train_rows": self.train_rows, "options": asdict(self.options), "concurrent": self.concurrent,
                "trials_path": self.trials_path, "mlflow": asdict(self.mlflow)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudySettings:
        known = {f.name for f in dataclasses.fields(StudyOptions)}
        return cls(name=data["name"], storage=data["storage"], base=config_mod.from_dict(data["base"]),
                   dataset=data["dataset"], train_rows=int(data["train_rows"]),
                   options=StudyOptions(**{k: v for k, v in data["options"].items() if k in known}),
                   concurrent=int(data["concurrent"]), mlflow=StudyTracking(**data["mlflow"]))

    @classmethod
    def new(cls, name: str, storage_path: str, base: config_mod.Config, dataset: str, train_rows: int,
            options: StudyOptions, concurrent: int, mlflow: StudyTracking) -> StudySettings:
        return cls(name, storage_uri(storage_path), base, dataset, train_rows, options, concurrent, mlflow)

    def save(self) -> None:
        write_run(self.storage, self.name, self.to_dict(), STUDY_FILE)

    @classmethod
    def read(cls, storage_path: str, name: str) -> StudySettings | None:
        """The saved study ``name``, or None; a file this version cannot read is a ``StudyError``."""
        data = read_run(storage_path, name, STUDY_FILE)
        if data is None:
            return None
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, config_mod.ConfigError) as err:
            raise StudyError(f"study '{name}': cannot read its {STUDY_FILE} ({err})") from None


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of a study is given: the base it changes, the data, its share of the cluster and
    the MLflow parent it logs under."""

    study: str
    base: config_mod.Config
    dataset: str
    trials_path: str
    workers: int
    cpus_per_worker: float | None
    gpus_per_worker: float | None
    placement: str
    concurrent: int
    tracking_uri: str
    experiment: str
    parent_run_id: str

    @classmethod
    def of(cls, settings: StudySettings) -> TrialSpec:
        options = settings.options
        return cls(settings.name, settings.base, settings.dataset, settings.trials_path, options.workers_per_trial,
                   options.cpus_per_worker, options.gpus_per_worker, options.placement, settings.concurrent, settings.mlflow.uri,
                   settings.mlflow.experiment, settings.mlflow.run_id)


def trial_config(base: config_mod.Config, sample: dict[str, Any]) -> config_mod.Config:
    """The study's base config with one trial's sampled values (dotted keys)."""
    return config_mod.with_overrides(base, sample, f"trial {sample}: ")


def trial_number(trial_id: str) -> str:
    """Tune's trial ids are ``<experiment>_<counter>``; the counter names a trial for people."""
    return trial_id.rsplit("_", 1)[-1]

"""ASHA whose rungs survive ``mlo-mae tune --resume``.

``Tuner.restore`` brings back the trials and the searcher but rebuilds the
scheduler from the study's start, with empty rungs: the trials after a resume
would then be compared only with each other. This scheduler writes its state
(ASHA's own ``__dict__``, as ``ASHAScheduler.save`` does) to the study folder
after every decision and reads it back before its first decision after a restore.
"""

from __future__ import annotations

import pickle

import pyarrow.fs
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from ..storage import filesystem


class KeptASHA(ASHAScheduler):
    def __init__(self, state_uri: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_uri = state_uri
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        fs, path = filesystem(self._state_uri)
        if fs.get_file_info(path).type == pyarrow.fs.FileType.File:  # decisions made before the restore
            with fs.open_input_stream(path) as handle:
                self.__dict__.update(pickle.loads(handle.read()))

    def _keep(self) -> None:
        fs, path = filesystem(self._state_uri)
        with fs.open_output_stream(path) as handle:
            handle.write(pickle.dumps(self.__dict__))

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._keep()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._keep()

"""What ``probe`` and ``finetune`` start from: a checkpoint folder, a run folder, or an MLflow run id.

Whichever is given, the result is the same: the saved engine state, the data
set the run trained on, and the MLflow run to log the results under.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlo_mae import config as config_mod
from mlo_mae.errors import InputError

from . import tracking

if TYPE_CHECKING:  # torch and the checkpoint reader are imported when a source is loaded, not checked
    import torch

    from mlo_mae.mae import MaskedAutoencoderViT


class SourceError(InputError):
    """SOURCE cannot be used; one line naming it and what was expected."""


@dataclass
class Pretrained:
    state: dict[str, Any]  # the engine's saved state
    checkpoint: str
    dataset: str | None  # where the pretrain run's data set was
    run_id: str | None  # the pretrain run in MLflow, when it was tracked
    tracking_uri: str | None

    @property
    def config(self) -> config_mod.Config:
        return config_mod.from_dict(self.state["config"])

    @property
    def iteration(self) -> int:
        return int(self.state["iteration"])

    def encoder(self, device: torch.device | str = "cpu") -> MaskedAutoencoderViT:
        """E+D with the saved weights (the decoder comes along; probes use ``forward_features``)."""
        from mlo_mae.factory import create_mae

        mae = create_mae(self.config.model)
        mae.load_state_dict(self.state["modules"]["mae"])
        return mae.to(device)


def _run_settings(run_dir: str) -> dict[str, Any]:
    """The run's saved settings (``mlo-mae-run.yaml``), empty when the folder has none."""
    from .storage import read_run

    storage, name = run_dir.rstrip("/").rsplit("/", 1)
    return read_run(storage, name) or {}


def _from_folder(folder: str, uri: str, prefer_given: bool = False) -> Pretrained:
    from . import checkpoints

    folder = folder.rstrip("/")
    if checkpoints.is_complete(folder):
        checkpoint, run_dir = folder, os.path.dirname(folder)
    else:
        found = checkpoints.complete_in(folder)
        if not found:
            raise SourceError(f"'{folder}' holds no complete checkpoint (a checkpoint_* folder with "
                              f"{checkpoints.STATE_FILE} and {checkpoints.META_FILE}, or a run folder of them)")
        checkpoint, run_dir = found[-1][1], folder
    settings = _run_settings(run_dir)
    logged = settings.get("mlflow") or {}
    try:
        state = checkpoints.read_state(checkpoint)
    except Exception as err:  # noqa: BLE001 - a torn or foreign file, one line
        raise SourceError(f"'{checkpoint}/{checkpoints.STATE_FILE}' cannot be read: {err}") from None
    return Pretrained(state=state["engine"], checkpoint=checkpoint, dataset=settings.get("dataset"),
                      run_id=logged.get("run_id"),
                      tracking_uri=uri if prefer_given or not logged.get("uri") else logged["uri"])


def is_folder(source: str) -> bool:
    return "://" in source or os.path.exists(source)


def check_source(source: str) -> None:
    """A ``SourceError`` unless SOURCE can be a folder or an MLflow run id (cheap: nothing is read)."""
    if not is_folder(source) and not re.fullmatch(r"[0-9a-f]{32}", source):
        raise SourceError(f"SOURCE '{source}' is neither an existing checkpoint or run folder nor an MLflow run id")


def load_pretrained(source: str, uri: str, prefer_given: bool = False) -> Pretrained:
    """SOURCE: a checkpoint folder, a run folder (its newest checkpoint) or an MLflow run id.
    Results are logged where the pretrain run was, unless ``prefer_given`` (an explicit --tracking-uri)."""
    check_source(source)
    if is_folder(source):
        return _from_folder(source, uri, prefer_given)
    try:
        run = tracking.client(uri).get_run(source)
    except Exception as err:  # noqa: BLE001 - MlflowException, connection errors
        raise SourceError(f"MLflow run '{source}' not found at {uri}: {' '.join(str(err).split())[:200]}") from None
    tags = run.data.tags
    if tags.get(tracking.KIND_TAG) != "pretrain":
        raise SourceError(f"MLflow run '{source}' is a {tags.get(tracking.KIND_TAG, 'foreign')} run, "
                          "not an mlo-mae pretrain run")
    run_dir = tags.get(tracking.RUN_DIR_TAG)
    if not run_dir:
        raise SourceError(f"MLflow run '{source}' has no '{tracking.RUN_DIR_TAG}' tag (where its checkpoints are)")
    pretrained = _from_folder(run_dir, uri)
    pretrained.run_id, pretrained.tracking_uri = source, uri
    return pretrained

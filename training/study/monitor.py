"""The study driver's Tune callback: progress lines, the MLflow side of what Tune decides, and the
placement groups of ended trials."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
import ray.tune

from .. import tracking
from .checks import metric_mode
from .results import format_value, trial_error, trial_outcome, trial_run_id, trial_total
from .settings import StudySettings, trial_number
from .trial import STOPPED_EARLY_TAG


def release_groups(group_ids: list[str]) -> None:
    """Remove the placement groups among ``group_ids`` that still hold resources (their trials ended)."""
    from ray.util.placement_group import PlacementGroup, placement_group_table

    table = placement_group_table()
    for group_id in group_ids:
        if table.get(group_id, {}).get("state") == "CREATED":
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


class StudyMonitor(ray.tune.Callback):
    """Progress lines for the user, and the MLflow side of what Tune decides: the runs of trials that
    a scheduler stopped (their process was ended, not finished) and the study's best value so far.

    Pickled with the Tuner and restored with it, so it keeps no state beyond the placement groups it
    is about to remove.
    """

    RELEASE_AFTER_S = 15.0  # Tune has ended the trial's process by then; earlier, Train would restart its workers

    def __init__(self, settings: StudySettings, echo: Callable[[str], None]) -> None:
        self.settings, self.echo = settings, echo

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        params = ", ".join(f"{k}={format_value(v)}" for k, v in trial.config.items())
        self.echo(f"trial {trial_number(trial.trial_id)} started: {params}")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        metric = self.settings.metric
        if result.get("evaluated") and metric in result:
            self.echo(f"trial {trial_number(trial.trial_id)}: iteration {result['iteration']}/"
                      f"{trial_total(self.settings, trial.config)} | {metric} {result[metric]:.4f}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        metric, total = self.settings.metric, trial_total(self.settings, trial.config)
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
        due = [g for t, g in self.__dict__.get("_to_release", []) if t <= time.monotonic()]
        if due:
            self._to_release = [(t, g) for t, g in self._to_release if g not in due]
            release_groups(due)

    def _close(self, trial, status: str, tags: dict[str, str]) -> None:
        """End the trial's MLflow run as Tune ended the trial (the trial never ends it itself)."""
        uri, run_id = self.settings.mlflow.uri, trial_run_id(self.settings, trial.trial_id)
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
        metric = self.settings.metric
        statuses = {t.trial_id: status if t is ended else t.status for t in trials}
        done = [t for t in trials if statuses[t.trial_id] in ("TERMINATED", "ERROR")]
        values = [t.last_result[metric] for t in done if metric in (t.last_result or {}) and trial_outcome(
            statuses[t.trial_id], t.last_result.get("iteration"), trial_total(self.settings, t.config)) == "finished"]
        if values:
            best = (max if metric_mode(metric) == "max" else min)(values)
            uri, parent = self.settings.mlflow.uri, self.settings.mlflow.run_id
            self._guarded("logging the best value", lambda: tracking.client(uri).log_metric(
                parent, f"best/{metric}", best, step=len(done)))

    def _guarded(self, what: str, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as err:  # noqa: BLE001 - the study goes on without this record
            self.echo(f"warning: MLflow: {what} failed: {' '.join(str(err).split())[:200]}")

"""A study's outcome: one row per trial read back from Tune's state, the best trial, the table printed
at the end, ``results.csv`` and ``best-config.yaml``."""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from mlo_mae import config as config_mod

from ..launch import last_error_line
from ..storage import filesystem, read_run
from mlo_mae.config import total_iterations
from .checks import metric_mode
from .settings import StudySettings, trial_config, trial_number

BEST_CONFIG = "best-config.yaml"


@dataclass
class TrialRow:
    """One line of the results table."""

    number: str
    trial_id: str
    params: dict[str, Any]
    metric: float | None
    iteration: int | None
    total: int | None  # None: a sampled combination the config rejects
    status: str  # finished | stopped early | failed | interrupted | pending
    run_id: str | None
    error: str = ""


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_outcome(status: str, iteration: int | None, total: int | None) -> str:
    if status == "ERROR":
        return "failed"
    if status == "TERMINATED":
        return "finished" if iteration is not None and total is not None and iteration >= total else "stopped early"
    return "interrupted" if status in ("RUNNING", "PAUSED") else "pending"


def trial_total(settings: StudySettings, sample: dict[str, Any]) -> int | None:
    """The iterations a trial with these sampled values runs when nothing stops it; None for a combination
    the config rejects (each value fitted the base, together they do not): that trial fails with the
    config's line, and the study goes on."""
    try:
        return total_iterations(trial_config(settings.base, sample), settings.train_rows)
    except config_mod.ConfigError:
        return None


def trial_run_id(settings: StudySettings, trial_id: str) -> str | None:
    """The trial's MLflow run, from the run file the trial saved (None before it started)."""
    saved = read_run(settings.trials_path, trial_id)
    return saved["mlflow"]["run_id"] if saved else None


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


def results(settings: StudySettings) -> list[TrialRow]:
    """The table of every trial, read back from Tune's experiment state."""
    from ray.tune import ExperimentAnalysis

    metric = settings.metric
    analysis = ExperimentAnalysis(settings.folder, default_metric=metric, default_mode=metric_mode(metric))
    rows = []
    for trial in analysis.trials:  # in the order they were created
        last = trial.last_result or {}
        total = trial_total(settings, trial.config)
        rows.append(TrialRow(trial_number(trial.trial_id), trial.trial_id, dict(trial.config), last.get(metric),
                             last.get("iteration"), total, trial_outcome(trial.status, last.get("iteration"), total),
                             trial_run_id(settings, trial.trial_id),
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
             f"{r.iteration if r.iteration is not None else 0}/{r.total if r.total is not None else '-'}",
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


def best_config_yaml(row: TrialRow, settings: StudySettings) -> str:
    """The best trial's whole config, as ``mlo-mae pretrain --config`` reads it."""
    cfg = trial_config(settings.base, row.params)
    head = (f"# Best trial of study '{settings.name}': trial {row.number} ({row.trial_id}), {settings.metric} "
            f"{row.metric:.4f} at iteration {row.iteration}/{row.total}, MLflow run {row.run_id}.\n"
            f"# Train it: mlo-mae pretrain --config THIS_FILE\n")
    return head + cfg.to_yaml()


def write_text(folder: str, name: str, text: str) -> None:
    fs, root = filesystem(folder)
    with fs.open_output_stream(f"{root}/{name}") as handle:
        handle.write(text.encode())

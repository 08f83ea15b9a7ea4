"""`mlo-mae tune`: real Ray Tune studies of real pretrain trials on the built-in digits, recorded in a
real MLflow store, plus the checks that run before anything starts.

The 4-trial study is interrupted with SIGINT while its second trial trains and
then resumed, so one run covers ASHA, the MLflow parent and child runs, the
results table, the best config and ``--resume``.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from cli_runner import run_cli

from mlo_mae import config as config_mod
from training.study import checks, results
from training.study.settings import StudyError, StudyOptions
from training.study.trial import STOPPED_EARLY_TAG, STUDY_TAG
from tune_spaces.space import load_space

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, str(ROOT / "cli.py")]
pytestmark = pytest.mark.usefixtures("ray_cluster")


def _runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- checks before anything starts (no Ray) ---------------------------------------------------------

@pytest.mark.parametrize("space, flags, expected", [
    ("space:\n  mlo.mask_rato: {uniform: [0.5, 0.9]}\n", [], "unknown config key 'mlo.mask_rato' (did you mean "
                                                             "'mlo.mask_ratio'?)"),
    ("space:\n  optim.lr_mask: {loguniform: [0.0, 1.0e-3]}\n", [], "loguniform needs low > 0"),
    ("space:\n  mlo.mask_ratio: {uniform: [0.5, 0.9]}\n", ["--mask-ratio", "0.6"],
     "mlo.mask_ratio is searched by"),
    ("space:\n  mlo.mask_ratio: {grid: [0.5, 0.9]}\n", ["--search", "optuna"], "Optuna cannot sample"),
    ("space:\n  mlo.mask_ratio: {uniform: [0.5, 0.9]}\n", ["--metric", "probe_test_top1"],
     "the test split never selects a model"),
    ("space:\n  mlo.mask_ratio: {uniform: [0.5, 0.9]}\n", ["--metric", "probe_val_top1"], "use --scheduler fifo"),
    ("space:\n  mlo.mask_ratio: {uniform: [0.5, 0.9]}\n", ["--metric", "probe_val_top1", "--scheduler", "fifo",
                                                           "--search", "optuna"], "Optuna reads the metric"),
    ("space:\n  mlo.mask_ratio: {uniform: [0.5, 0.9]}\n", ["-o", "run.eval_every=0"], "run.eval_every is 0"),
    ("space:\n  run.eval_every: {choice: [2, 3]}\n", [], "run.eval_every cannot be searched"),
    ("space:\n  model.embed_dim: {choice: [192, 96]}\n", ["-o", "model.num_heads=64"],
     "choice value 96 does not fit this study's config"),
])
def test_bad_space_or_options_are_one_line_errors(tmp_path, space, flags, expected, cli_run):
    path = _write(tmp_path / "my-space.yaml", space)
    result = cli_run("tune", "--space", str(path), *flags, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlo-mae: error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "ray_results").exists()  # nothing started


def test_a_batch_larger_than_a_split_is_refused_for_the_largest_value_of_the_space(tmp_path, cli_run):
    path = _write(tmp_path / "batches.yaml", "space:\n  data.batch_head: {choice: [16, 5000]}\n")
    result = cli_run("tune", "--space", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "data.batch_head (5000) x 1 worker(s) is larger than the train split" in result.stderr
    assert str(path) in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_longest_trial_takes_the_ends_that_make_a_trial_longest():
    base = config_mod.resolve(overrides={"run.epochs": 2.0, "data.batch_mae": 32})
    space = load_space(ROOT / "tune_spaces" / "default.yaml")  # mlo.unroll_mae: randint [1, 3]
    # ceil(epochs * rows / (batch * unroll)) at the shortest unroll, by hand: ceil(2 * 1000 / (32 * 1)) = 63
    assert checks.longest_trial(space, base, 1000) == 63
    fixed = load_space(ROOT / "tune_spaces" / "cpu-smoke.yaml")
    assert checks.longest_trial(fixed, config_mod.resolve(overrides=fixed.fixed), 1000) == 6


def test_concurrency_and_placement_on_cpu_and_gpu_clusters():
    base = config_mod.resolve()  # run.device auto
    one, two = StudyOptions(workers_per_trial=1), StudyOptions(workers_per_trial=2)
    assert checks.concurrency(one, base, {"CPU": 2.0}, 4) == 1
    assert checks.concurrency(one, base, {"CPU": 16.0}, 4) == 4  # capped by the trials
    assert checks.concurrency(one, base, {"CPU": 16.0}, 20) == 4  # 16 // (2 CPUs + 0.5 driver + 1 Ray Data)
    assert checks.concurrency(StudyOptions(max_concurrent=8), base, {"CPU": 16.0}, 2) == 2
    assert checks.concurrency(two, base, {"CPU": 64.0, "GPU": 8.0}, 20) == 4  # a GPU a worker
    checks.check_fits(one, base, {"CPU": 2.0}, 1)  # 0.5 driver + 0.5 worker + 1 for Ray Data
    with pytest.raises(StudyError, match="need 3 CPUs"):
        checks.check_fits(StudyOptions(workers_per_trial=3), base, {"CPU": 2.0}, 1)
    with pytest.raises(StudyError, match="and 2 GPUs; the cluster has 16 CPUs and 1 GPUs"):
        checks.check_fits(two, base, {"CPU": 16.0, "GPU": 1.0}, 1)  # one H100, two workers
    cpu_only = config_mod.resolve(overrides={"run.device": "cpu"})  # GPUs present but not asked for
    checks.check_fits(two, cpu_only, {"CPU": 16.0, "GPU": 1.0}, 1)


def test_best_trial_is_chosen_among_trials_that_ran_to_the_end():
    def row(number, metric, status):
        return results.TrialRow(number, f"x_{number}", {}, metric, 3 if status == "stopped early" else 12, 12,
                              status, None)

    rows = [row("0", 0.9, "stopped early"), row("1", 0.5, "finished"), row("2", 0.7, "finished"),
            row("3", None, "failed")]
    assert results.best_row(rows, "val_top1").number == "2"
    assert results.best_row(rows, "val_loss").number == "1"
    assert results.best_row([rows[0], rows[3]], "val_top1") is None
    assert results.trial_outcome("TERMINATED", 3, 12) == "stopped early"
    assert results.trial_outcome("TERMINATED", 12, 12) == "finished"


def test_grace_period_falls_on_an_evaluation():
    assert checks.grace_period(StudyOptions(), 25, 180) == 25
    assert checks.grace_period(StudyOptions(grace_period=30), 25, 180) == 50
    assert checks.grace_period(StudyOptions(grace_period=30), 25, 40) == 40


# --- real studies ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """cpu-smoke, 2 trials one at a time, ASHA on val_loss (C's sampled learning rate spreads it: search
    seed 4 samples lr_head 8.5e-3, then 1.3e-4, which falls behind at the first rung);
    SIGINT while the first trial trains past its checkpoint at iteration 4, then --resume. Real processes:
    the interruption is a signal. The session's MLflow store, experiment 'study'."""
    cwd = tmp_path_factory.mktemp("study")
    uri = os.environ["MLFLOW_TRACKING_URI"]
    args = ["tune", "--space", "cpu-smoke", "--num-samples", "2", "--search-seed", "4", "--max-concurrent", "1",
            "--metric", "val_loss",
            "--name", "smoke", "--tracking-uri", uri, "--experiment", "study"]
    proc = subprocess.Popen([*CLI, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first: list[str] = []
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        first.append(line)
        if line.startswith("trial 00000: iteration 4/6"):
            proc.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline, "".join(first)
    out, err = proc.communicate(timeout=300)
    interrupted = {"stdout": "".join(first) + out, "stderr": err, "rc": proc.returncode,
                   "statuses": {r.info.run_name: r.info.status for r in _runs(uri, "study")}}
    resumed = run_cli("tune", "--resume", "smoke", cwd=cwd)  # in this process: only the interruption needs one
    return {"cwd": cwd, "uri": uri, "interrupted": interrupted, "resumed": resumed,
            "folder": cwd / "ray_results" / "smoke"}


def test_interrupted_study_says_how_to_resume_and_leaves_no_run_running(smoke_study):
    first = smoke_study["interrupted"]
    assert first["rc"] == 130, first["stderr"][-2000:]
    assert "continue with 'mlo-mae tune --resume smoke'" in first["stderr"]
    assert first["statuses"] == {"smoke": "KILLED", "smoke-00000": "KILLED"}, first["statuses"]


def test_resumed_study_finishes_with_asha_stopping_trials(smoke_study):
    resumed = smoke_study["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(smoke_study["folder"] / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    statuses = [r["status"] for r in rows]
    assert statuses.count("stopped early") >= 1 and set(statuses) <= {"finished", "stopped early"}, statuses
    for r in rows:  # stopped early: behind at a rung, before the end
        assert (int(r["iteration"]) < 6) == (r["status"] == "stopped early")
    assert "stopped early" in resumed.stdout and "best: trial" in resumed.stdout
    assert "Configuration for experiment" not in resumed.stdout  # Tune's own banner stays out of the way
    assert (smoke_study["folder"] / "asha-state.pkl").is_file()  # the rungs outlive the restore


def test_interrupted_trial_went_on_from_its_checkpoint(smoke_study):
    runs = {r.info.run_name: r for r in _runs(smoke_study["uri"], "study")}
    history = mlflow.MlflowClient(smoke_study["uri"]).get_metric_history(runs["smoke-00000"].info.run_id,
                                                                        "eval/val_loss")
    steps = sorted(m.step for m in history)
    # from the checkpoint at 4: then 6; a restart from scratch would log step 0 twice
    assert steps.count(0) == 1 and steps[-1] == 6 and {0, 2, 4} <= set(steps), steps


def test_study_is_one_parent_run_with_one_child_per_trial(smoke_study):
    runs = _runs(smoke_study["uri"], "study")
    parents = [r for r in runs if r.data.tags.get("mlo_mae.kind") == "tune"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags[STUDY_TAG] == "smoke"
    assert parent.data.params["space.optim.lr_mask"] == "loguniform(1e-05, 0.001)"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3  # the resumed trial kept its run: no third child
    with open(smoke_study["folder"] / "results.csv") as handle:
        rows = {r["mlflow_run_id"]: r for r in csv.DictReader(handle)}
    client = mlflow.MlflowClient(smoke_study["uri"])
    for child in children:
        row = rows[child.info.run_id]
        assert child.info.status == "FINISHED"
        assert child.data.tags[STOPPED_EARLY_TAG] == str(row["status"] == "stopped early").lower()
        assert float(child.data.params["mlo.mask_ratio"]) == pytest.approx(float(row["mlo.mask_ratio"]))
        history = client.get_metric_history(child.info.run_id, "eval/val_loss")
        assert max(m.step for m in history) >= int(row["iteration"])  # a stopped trial may log a little more
        artifacts = {f.path for f in client.list_artifacts(child.info.run_id)}
        assert "images" in artifacts  # the heatmaps of every evaluation (log_image)
        if row["status"] == "finished":  # the end of a run: evolution GIF, the encoder for timm
            assert {"heatmaps", "model", "checkpoint.json"} <= artifacts
    best = min((r for r in rows.values() if r["status"] == "finished"), key=lambda r: float(r["val_loss"]))
    assert parent.data.tags["mlo_mae.best_run"] == best["mlflow_run_id"]
    assert parent.data.metrics["best/val_loss"] == pytest.approx(float(best["val_loss"]))
    assert parent.data.metrics["trials/stopped_early"] >= 1
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "best-config.yaml", "space.yaml"} <= artifacts


def test_best_config_is_accepted_by_pretrain_unchanged(smoke_study, cli_run):
    path = smoke_study["folder"] / "best-config.yaml"
    printed = cli_run("pretrain", "--config", str(path), "--print-config", cwd=smoke_study["cwd"])
    assert printed.returncode == 0, printed.stderr
    loaded = yaml.safe_load(printed.stdout)
    with open(smoke_study["folder"] / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    best = min((r for r in rows if r["status"] == "finished"), key=lambda r: float(r["val_loss"]))
    trial = yaml.safe_load((smoke_study["folder"] / "trials" / best["trial_id"] / "mlo-mae-run.yaml").read_text())
    assert loaded == config_mod.from_dict(trial["config"]).to_dict()
    assert loaded["mlo"]["mask_ratio"] == pytest.approx(float(best["mlo.mask_ratio"]))
    assert loaded["run"]["max_steps"] == 6 and loaded["run"]["probe"] is False  # the space's fixed keys


def test_a_failing_trial_is_reported_and_the_next_one_picks_the_best_by_probe(tmp_path, cli_run):
    """Random search over a width and a head count that each fit the base config but not always each other,
    FIFO on the end-of-run probe: search seed 10 samples 195 wide with 64 heads first, a trial that fails
    with the config's line before it starts Ray Train, then 192 with 3, which runs to its end and is the
    best. (A trial that fails while training ends the same way: ``pretrain`` raises, the trial fails;
    the NaN that stops a run is tested in test_distributed.)"""
    space = _write(tmp_path / "widths.yaml", "space:\n  model.embed_dim: {choice: [192, 195]}\n"
                   "  model.num_heads: {choice: [3, 64]}\n"
                   "fixed:\n  run.max_steps: 3\n  run.eval_every: 3\n  run.eval_samples: 32\n"
                   "  data.batch_mae: 16\n  data.batch_head: 16\n  data.batch_mask: 16\n")
    uri = os.environ["MLFLOW_TRACKING_URI"]  # the session's store: its schema exists already
    result = cli_run("tune", "--space", str(space), "--num-samples", "2", "--search-seed", "10", "--scheduler",
                     "fifo", "--metric", "probe_val_top1", "--name", "widths", "--tracking-uri", uri,
                     "--experiment", "widths", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial 00000 failed: " in result.stdout and "must divide by their number of heads" in result.stdout
    with open(tmp_path / "ray_results" / "widths" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["failed", "finished"]
    assert [(r["model.embed_dim"], r["model.num_heads"]) for r in rows] == [("195", "64"), ("192", "3")]
    assert "must divide" in rows[0]["error"] and 0.5 < float(rows[1]["probe_val_top1"]) <= 1.0
    best = yaml.safe_load((tmp_path / "ray_results" / "widths" / "best-config.yaml").read_text())
    assert (best["model"]["embed_dim"], best["model"]["num_heads"]) == (192, 3)
    statuses = {r.info.run_name: r.info.status for r in _runs(uri, "widths")}
    assert statuses == {"widths": "FINISHED", "widths-00001": "FINISHED"}  # the failed trial never had a run


def test_optuna_study_whose_trial_fails_ends_failed(tmp_path, cli_run):
    """Optuna samples a width and a head count that each fit the base config but not each other: the trial
    fails with the config's one line before it trains; with no trial finished the study fails (exit 1)
    and so does its MLflow parent run."""
    space = _write(tmp_path / "heads.yaml", "space:\n  model.embed_dim: {choice: [195, 189]}\n"
                   "  model.num_heads: {choice: [64, 32]}\n"
                   "fixed:\n  run.max_steps: 3\n  run.eval_every: 3\n  run.probe: false\n")
    uri = os.environ["MLFLOW_TRACKING_URI"]  # the session's store: its schema exists already
    result = cli_run("tune", "--space", str(space), "--num-samples", "1", "--search", "optuna", "--name", "heads",
                     "--tracking-uri", uri, "--experiment", "heads", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stdout.count("must divide by their number of heads") == 2, result.stdout  # progress + table
    assert result.stderr.strip().splitlines() == ["mlo-mae: error: no trial ran to its end with a val_top1; see the "
                                                  "table above (the trials' output is in the Ray logs, "
                                                  "/tmp/ray/session_latest/logs)"]
    runs = _runs(uri, "heads")
    assert [r.data.tags.get("mlo_mae.kind") for r in runs] == ["tune"]  # the trial failed before its run
    parent = runs[0]
    assert parent.info.status == "FAILED" and parent.data.metrics["trials/failed"] == 1
    assert parent.data.params["tune.search"] == "optuna"
    assert not (tmp_path / "ray_results" / "heads" / "best-config.yaml").exists()

"""`mlo-mae pretrain --workers 2` on a real local Ray cluster: identical replicas, a lost node,
stopped and killed drivers and resume, divergence.

The session's cluster (``ray start --head``, 2 CPUs, see conftest) serves every
run here through ``--address``, joined by a second node (a raylet of its own) where a test
is about nodes; the runs are real ``mlo-mae`` processes where
signals and exit codes are under test. Every run has the seed, settings and data of the session's
uninterrupted reference run (``shared_runs``, which ``test_tracking`` reads too), so every way of
reaching the last iteration (uninterrupted, a node lost, stopped or killed and resumed) must end with the
same parameters.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cluster import kill_node, start_node, stop_cluster
import mlflow
from shared_runs import RUN_ID, STEPS, TRAINING

from training import checkpoints

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| ")


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """The session's 2-CPU Ray cluster (a head node of its own processes, see conftest)."""
    return ray_cluster["address"]


def _command(storage: Path | str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "pretrain", "--storage-path", str(storage), *args]


def _env(address: str) -> dict:
    return {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}


def run_until(address: str, storage: Path | str, actions: list, *args: str) -> tuple[int, str, str]:
    """Start a run; ``actions`` is a list of (step, action): each ``action(process)`` is called, in turn,
    the next time the run prints that step; then wait for the run to end."""
    proc = subprocess.Popen(_command(storage, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(address))
    lines, pending = [], list(actions)
    for line in proc.stdout:
        lines.append(line)
        match = STEP_LINE.match(line)
        if match and pending and int(match.group(1)) == pending[0][0]:
            pending.pop(0)[1](proc)
            if not pending:
                break
    out, err = proc.communicate(timeout=900)
    return proc.returncode, "".join(lines) + out, err


def steps(stdout: str) -> list[int]:
    return [int(m.group(1)) for m in map(STEP_LINE.match, stdout.splitlines()) if m]


def final_state(stdout: str) -> dict:
    """The state of the run's final checkpoint (a folder, or a URI in the bucket)."""
    return checkpoints.read_state(re.search(r"^final checkpoint: (.+)$", stdout, re.M).group(1))


def assert_same_parameters(a: dict, b: dict) -> None:
    assert a["engine"]["iteration"] == b["engine"]["iteration"] == STEPS
    assert a["engine"]["level_steps"] == b["engine"]["level_steps"]
    for module in ("mae", "head", "masknet"):
        for key, tensor in a["engine"]["modules"][module].items():
            other = b["engine"]["modules"][module][key]
            assert torch.allclose(tensor.double(), other.double(), rtol=0, atol=1e-6), f"{module}.{key}"


def assert_continuous(seen: list[int], resumed_at: int, last: int = STEPS) -> None:
    """Steps rise by one; after the restart they go on from the checkpoint, up to ``last``."""
    restart = next(i for i in range(1, len(seen)) if seen[i] <= seen[i - 1])
    assert seen[:restart] == list(range(1, restart + 1))
    assert seen[restart:] == list(range(resumed_at + 1, last + 1))


@pytest.fixture(scope="module")
def flags(reference):
    """The reference run's training flags and data: every run here must end like it."""
    return [*TRAINING, "--dataset", str(reference["data"])]


def test_two_workers_finish_with_identical_replicas(reference):
    out = reference["result"].stdout
    assert "2 worker(s) | global batch 32 (= 2 x 16 per worker) | lr scaling 'linear' x2" in out
    assert steps(out) == list(range(1, STEPS + 1))
    line = re.search(r"^2 replicas identical: rank 0 (.+); rank 1 (.+)$", out, re.M)
    assert line, out
    assert line.group(1) == line.group(2)  # sha256 of every tensor of E+D, C and T
    state = final_state(out)
    assert state["data"]["world_size"] == 2
    assert state["data"]["levels"]["mae"] == {"batches": 2 * STEPS, "batch_size": 16}


@pytest.fixture
def second_node(reference, ray_cluster, tmp_path_factory):
    """A second Ray node (1 CPU, its own raylet and processes) joined to the session's head for one test,
    after the reference run; stopped at the end if the test left it alive. Only its own processes."""
    temp = tmp_path_factory.mktemp("node")
    start_node(ray_cluster["address"], temp, cpus=1)
    yield str(temp)
    stop_cluster(str(temp))


def resumed_at(stdout: str) -> int:
    return int(re.search(r"^resumed from the checkpoint at iteration (\d+)/", stdout, re.M).group(1))


def placements(stdout: str) -> list[tuple[int, list[str]]]:
    """(nodes, node id per rank) of every worker group the run started, in order."""
    found = re.findall(r"^(\d+) worker\(s\) on (\d+) node\(s\): (.+)$", stdout, re.M)
    return [(int(nodes), re.findall(r"rank \d+ on (\w+)", ranks)) for _, nodes, ranks in found]


@pytest.fixture
def bucket_digits(object_store, cli_run, tmp_path) -> str:
    """The reference's digits prepared into the session's bucket: the same shards (prepare is
    deterministic), so a run on them must end like the reference (which never reads the test split)."""
    uri = f"s3://{object_store.BUCKET}/datasets/digits"
    prepared = cli_run("prepare", "digits", uri, "--shard-rows", "128", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    return uri


def test_a_lost_node_and_a_killed_driver_both_end_like_the_uninterrupted_run(cluster, second_node, reference, flags,
                                                                            bucket_digits, object_store, cli_run):
    """Two nodes, a worker on each (--placement spread), shards and checkpoints in the bucket. At
    iteration 3 the second node's whole process tree is SIGKILLed (a machine lost): Ray marks the node
    dead, Ray Train restarts the group on the head from the checkpoint at 2 in the bucket and the run
    goes on. At 5 the driver is SIGKILLed (no chance to clean up); ``--resume`` goes on from the
    checkpoint at 4. The steps are continuous and the final parameters equal the uninterrupted run's.
    --cpus-per-worker 0.5: two workers and Ray Data fit the head alone."""
    storage = f"s3://{object_store.BUCKET}/runs"
    wide = [*TRAINING, "--dataset", bucket_digits, "--placement", "spread", "--cpus-per-worker", "0.5"]
    code, out, err = run_until(cluster, storage, [(3, lambda _: kill_node(second_node)),
                                                  (5, lambda p: p.send_signal(signal.SIGKILL))], *wide, "--name", "faults")
    assert code == -signal.SIGKILL, err
    groups = placements(out)
    assert len(groups) == 2, out
    (nodes, ranks), (after, moved) = groups
    assert nodes == 2 and len(set(ranks)) == 2  # spread: one worker on each node
    assert after == 1 and set(moved) < set(ranks)  # the survivors: the head only
    restarted = re.findall(r"^resumed from the checkpoint at iteration (\d+)/", out, re.M)
    assert len(restarted) == 1 and int(restarted[0]) in (2, 4), out  # 4 if the kill landed after step 4
    seen = steps(out)
    assert_continuous(seen, int(restarted[0]), seen[-1])
    assert seen[-1] >= 5  # the next step's line may be in the pipe when the driver dies
    stored = object_store.keys("runs/faults/")
    assert "runs/faults/mlo-mae-run.yaml" in stored and any(k.endswith("/state.pt") for k in stored)

    again = cli_run("pretrain", "--storage-path", storage, *flags, "--name", "faults")
    assert again.returncode == 2 and "already exists" in again.stderr
    wrong = cli_run("pretrain", "--storage-path", storage, "--resume", "faults", "--workers", "1")
    assert wrong.returncode == 2 and "started with 2 workers" in wrong.stderr
    resumed = cli_run("pretrain", "--storage-path", storage, "--resume", "faults")
    assert resumed.returncode == 0, resumed.stderr
    at = resumed_at(resumed.stdout)  # 4, or 6 if the workers stored it before Ray stopped them
    assert at in (4, 6) and steps(resumed.stdout) == list(range(at + 1, STEPS + 1))
    final = re.search(r"^final checkpoint: (.+)$", resumed.stdout, re.M).group(1)
    assert final.startswith(f"{storage}/faults/checkpoint_")
    assert_same_parameters(final_state(resumed.stdout), final_state(reference["result"].stdout))


def test_a_stopped_driver_exits_143_and_says_how_to_continue(cluster, flags, tmp_path):
    """SIGTERM (what a scheduler or `kill` sends; Ctrl-C takes the same path) once the run has joined Ray:
    Ray is shut down, the exit status is 128 + 15, the last line says how to continue and the MLflow run
    is KILLED, not left RUNNING."""
    proc = subprocess.Popen(_command(tmp_path, *flags, "--name", "stopped"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(cluster))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Ray: "):  # the cluster joined, Ray Train starting
            proc.send_signal(signal.SIGTERM)
            break
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never left running on the session's cluster
    out = "".join(lines) + out
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "continue with 'mlo-mae pretrain --resume stopped'" in err.strip().splitlines()[-1], err
    run_id = RUN_ID.search(out).group(1)
    assert mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id).info.status == "KILLED"


def test_nan_on_one_rank_stops_every_rank_and_keeps_the_last_good_checkpoint(cluster, flags, tmp_path, cli_run,
                                                                            monkeypatch):
    """Rank 1's 7th Stage-I batch (the first of iteration 4) is NaN: the averaged loss is NaN on both
    ranks, both stop before updating, the run ends with one line and is not retried. A checkpoint every
    iteration: the last two of the three written are kept."""
    monkeypatch.setenv("MLO_MAE_INJECT_NAN", "mae:6:1")
    result = cli_run("pretrain", "--storage-path", tmp_path, *flags, "-o", "run.checkpoint_every=1",
                     "--name", "diverged")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == ["mlo-mae: error: training stopped: non-finite Stage-I (reconstruction) loss (nan) at "
                     "iteration 4; the last good checkpoint (iteration 3) is kept"], result.stderr
    assert "resumed" not in result.stdout  # a NaN is not retried
    assert steps(result.stdout) == [1, 2, 3]
    kept = sorted(torch.load(folder / "state.pt", weights_only=True)["engine"]["iteration"]
                  for folder in (tmp_path / "diverged").glob("checkpoint_*") if folder.is_dir())
    assert kept == [2, 3]  # run.keep_checkpoints: the last two

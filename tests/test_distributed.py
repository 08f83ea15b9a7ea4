"""`mlo-mae pretrain --workers 2` on a real local Ray cluster: identical replicas, a killed worker,
stop and resume, divergence.

The session's cluster (``ray start --head``, 2 CPUs, see conftest) serves every
run here through ``--address``; the runs are real ``mlo-mae`` processes where
signals and exit codes are under test. Every run has the seed, settings and data of the session's
uninterrupted reference run (``shared_runs``, which ``test_tracking`` reads too), so every way of
reaching the last iteration (uninterrupted, a worker killed, stopped and resumed) must end with the
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
from cluster import cluster_pids, processes
from shared_runs import STEPS, TRAINING

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| ")


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """The session's 2-CPU Ray cluster (a head node of its own processes, see conftest)."""
    return ray_cluster["address"]


def _command(storage: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "pretrain", "--storage-path", str(storage), *args]


def _env(address: str) -> dict:
    return {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}


def run_until(address: str, storage: Path, actions: list, *args: str) -> tuple[int, str, str]:
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
    path = re.search(r"^final checkpoint: (.+)$", stdout, re.M).group(1)
    return torch.load(Path(path) / "state.pt", weights_only=True)


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


def test_a_killed_worker_and_a_stopped_driver_both_end_like_the_uninterrupted_run(cluster, ray_cluster, reference,
                                                                                  flags, tmp_path, cli_run):
    """One run, two faults: a worker killed at iteration 3 (Ray Train restarts the group from the checkpoint
    at 2 and the run goes on), then SIGTERM to the driver at iteration 5 (what a scheduler or `kill` sends;
    Ctrl-C takes the same path): exit 143 and how to continue. ``--resume`` goes on from the checkpoint at 4.
    The steps are continuous and the final parameters equal the uninterrupted run's."""
    def kill_a_worker(_proc):
        _, children = cluster_pids(ray_cluster["temp"])  # this cluster's, not another test's or benchmark's
        procs = processes()
        pids = sorted(pid for pid in children if "ray::RayTrainWorker" in procs.get(pid, (0, ""))[1])
        assert len(pids) == 2, [procs.get(pid) for pid in children]
        os.kill(pids[-1], signal.SIGKILL)

    code, out, err = run_until(cluster, tmp_path, [(3, kill_a_worker), (5, lambda p: p.send_signal(signal.SIGTERM))],
                               *flags, "--name", "faults")
    assert code == 128 + signal.SIGTERM, err
    assert "continue with 'mlo-mae pretrain --resume faults'" in err
    restarted = re.findall(r"^resumed from the checkpoint at iteration (\d+)/", out, re.M)
    assert len(restarted) == 1 and int(restarted[0]) in (2, 4), out  # 4 if the kill landed after step 4
    seen = steps(out)
    assert_continuous(seen, int(restarted[0]), seen[-1])
    assert seen[-1] >= 5
    again = cli_run("pretrain", "--storage-path", tmp_path, *flags, "--name", "faults")
    assert again.returncode == 2 and "already exists" in again.stderr
    wrong = cli_run("pretrain", "--storage-path", tmp_path, "--resume", "faults", "--workers", "1")
    assert wrong.returncode == 2 and "started with 2 workers" in wrong.stderr
    resumed = cli_run("pretrain", "--storage-path", tmp_path, "--resume", "faults", "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr
    at = int(re.search(r"^resumed from the checkpoint at iteration (\d+)/", resumed.stdout, re.M).group(1))
    assert at in (4, 6) and at <= seen[-1]  # the last checkpoint before the SIGTERM landed
    assert steps(resumed.stdout) == list(range(at + 1, STEPS + 1))
    assert_same_parameters(final_state(resumed.stdout), final_state(reference["result"].stdout))


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

"""Ray clusters that tests start as separate processes (``ray start``), and stop without touching any
other Ray cluster on the machine (``ray stop`` would stop them all)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

RAY_CLI = str(Path(sys.executable).with_name("ray"))


# The head's GCS checks every node each second and gives up on one after 3 missed checks: a lost node is
# noticed in ~3 s instead of Ray's default ~15 s (3 s x 5), which a test would only wait out.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _ray_start(temp: Path, cpus: int, *args: str) -> str:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **FAST_NODE_DEATH}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run([RAY_CLI, "start", "--num-cpus", str(cpus), "--num-gpus", "0", "--disable-usage-stats",
                            f"--temp-dir={temp}", *args], capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr
    return start.stdout + start.stderr


def start_head(temp: Path, cpus: int = 2) -> str:
    """A head node with ``cpus`` CPUs and its own temp dir; returns its address."""
    out = _ray_start(temp, cpus, "--head", "--port", "0", "--include-dashboard", "false")
    found = re.search(r"--address='([^']+)'", out)
    assert found, out
    return found.group(1)


def start_node(address: str, temp: Path, cpus: int = 1) -> None:
    """A second node (raylet) joined to the head at ``address``, with its own temp dir: its processes
    are told apart from the head's by it (``cluster_pids``), as a machine of its own would be."""
    _ray_start(temp, cpus, "--address", address)


def kill_node(temp: str) -> list[int]:
    """SIGKILL, at once, every process of the node whose temp dir is ``temp`` and every worker its raylet
    started: a machine lost, with no chance to clean up. Returns the pids."""
    own, workers = cluster_pids(temp)
    for pid in own | workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(own | workers)


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process, from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), args)
    return out


def cluster_pids(temp: str) -> tuple[set[int], set[int]]:
    """(this cluster's own processes, the workers its raylet started): found by the cluster's temp dir."""
    procs = processes()
    own = {pid for pid, (_, args) in procs.items() if temp in args and pid != os.getpid()}
    raylets = {pid for pid in own if "raylet/raylet" in procs[pid][1]}
    return own, {pid for pid, (parent, _) in procs.items() if parent in raylets}


def stop_cluster(temp: str, grace_s: float = 2.0) -> None:
    """SIGTERM to the cluster's processes, SIGKILL to those still there after ``grace_s``."""
    own, workers = cluster_pids(temp)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for pid in own | workers:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not any(Path(f"/proc/{pid}").exists() for pid in own | workers):
                return
            time.sleep(0.2)

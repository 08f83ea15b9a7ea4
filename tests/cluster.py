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


def start_head(temp: Path, cpus: int = 2) -> str:
    """A head node with ``cpus`` CPUs and its own temp dir; returns its address."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run([RAY_CLI, "start", "--head", "--num-cpus", str(cpus), "--num-gpus", "0", "--port", "0",
                            "--include-dashboard", "false", "--disable-usage-stats", f"--temp-dir={temp}"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr
    found = re.search(r"--address='([^']+)'", start.stdout + start.stderr)
    assert found, start.stdout
    return found.group(1)


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

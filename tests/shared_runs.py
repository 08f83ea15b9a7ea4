"""Components and runs that several test modules read, started once per session by conftest's fixtures:
an S3-API server (moto's), an ``mlflow server`` that keeps its artifacts in it, the sealed copy of the
digits and the suite's one uninterrupted 2-worker run.

Each Ray Train run costs about 30 s to start on 2 cores, whatever its length, so the
uninterrupted run that ``test_distributed`` compares every faulted run with is also the
tracked run whose params, metrics, heatmaps and encoder ``test_tracking`` reads back.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cli_runner import CliResult, run_cli

STEPS = 7  # the run's iterations: checkpoints at 2, 4, 6, evaluations at 0, 4 and 7
WORKERS = 2
TRAINING = ["--workers", str(WORKERS), "--max-steps", str(STEPS), "--batch-size", "16", "-o", "run.log_every=1",
            "-o", "run.checkpoint_every=2", "-o", "run.eval_every=4", "-o", "run.eval_samples=32",
            "-o", "run.probe=false", "-o", "run.threads=1"]  # 1 thread: what 2 workers get on 2 cores,
# also when they run on two Ray nodes of this one machine (each node counts the machine's cores as its own)
RUN_ID = re.compile(r"^MLflow run ([0-9a-f]{32}) ", re.M)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """moto's standalone S3-API server on loopback, with authentication on (a wrong key is refused): the
    IAM user ``tests`` may do anything, and bucket ``BUCKET`` exists. ``env`` is what a user would
    export to use it (endpoint, the user's key, region)."""

    BUCKET = "mlo-mae"

    def __init__(self, folder: Path) -> None:
        port = free_port()
        self.log = folder / "moto.log"
        # the first 3 requests (creating the user, its policy and key) need no signature; then every one does
        self.proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                      "-p", str(port)], stdout=subprocess.DEVNULL, stderr=open(self.log, "w"),
                                     env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"})
        try:
            self._set_up(f"http://127.0.0.1:{port}", port)
        except BaseException:
            self.stop()
            raise

    def _set_up(self, endpoint: str, port: int) -> None:
        import boto3

        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
                time.sleep(0.2)
        anonymous = boto3.session.Session(aws_access_key_id="setup", aws_secret_access_key="setup",
                                          region_name="us-east-1")
        iam = anonymous.client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="tests")
        iam.put_user_policy(UserName="tests", PolicyName="everything", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="tests")["AccessKey"]
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                    "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1"}
        self.s3 = boto3.session.Session(aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                                        aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                                        region_name="us-east-1").client("s3", endpoint_url=endpoint)
        self.s3.create_bucket(Bucket=self.BUCKET)

    def keys(self, prefix: str) -> list[str]:
        """The object keys under ``prefix`` in the bucket."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class MlflowServer:
    """``mlflow server`` on loopback at a free port (sqlite backend, proxied artifacts in ``artifacts``: a
    folder, or ``s3://...`` reached with this process's AWS settings).

    It starts at once and answers /health some 10 s later: ``uri`` waits for that, so that the
    session's Ray cluster and the sealed data get ready meanwhile. ``stop()`` sends SIGTERM."""

    def __init__(self, folder: Path, artifacts: str | None = None) -> None:
        port = free_port()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.log = folder / "server.log"
        self.proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server",
                                      "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                                      "--artifacts-destination", artifacts or str(folder / "artifacts"),
                                      "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env)
        self._uri, self._up = f"http://127.0.0.1:{port}", False

    @property
    def uri(self) -> str:
        deadline = time.monotonic() + 180
        while not self._up:
            try:
                with urllib.request.urlopen(f"{self._uri}/health", timeout=2) as reply:
                    self._up = reply.status == 200
            except OSError:
                pass
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 180 s"
            if not self._up:
                time.sleep(0.5)
        return self._uri

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def seal_digits(folder: Path) -> Path:
    """The digits prepared afresh into ``folder``, then every test shard overwritten: reading the test
    split fails, so a run that completes on it never read the test split."""
    prepared = run_cli("prepare", "digits", str(folder), "--shard-rows", "128", cwd=folder.parent)
    assert prepared.returncode == 0, prepared.stderr
    test_shards = sorted((folder / "test").glob("*.parquet"))
    assert test_shards
    for shard in test_shards:
        shard.write_bytes(b"not a parquet file")
    return folder


def reference_run(storage: Path, data: Path, tracking_uri: str) -> dict:
    """The uninterrupted 2-worker run on the sealed data, in this process, logged to ``tracking_uri``
    (experiment 'tracked'): its result, MLflow run id and storage folder."""
    result: CliResult = run_cli("pretrain", "--storage-path", storage, "--dataset", data, *TRAINING,
                                "--name", "reference", "--tracking-uri", tracking_uri, "--experiment", "tracked",
                                cwd=storage.parent)
    assert result.returncode == 0, result.stderr
    return {"result": result, "run_id": RUN_ID.search(result.stdout).group(1), "storage": storage,
            "data": data, "uri": tracking_uri}

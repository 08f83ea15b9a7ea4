"""Shared fixtures: a tiny model configuration that runs in milliseconds, and the session's shared
components: one MLflow store, one folder for the prepared digits, one Ray cluster."""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import Iterator

import pytest
import torch

from cli_runner import run_cli
from mlo_mae.config import Config, ModelConfig, resolve

torch.set_num_threads(2)


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[str]:
    """``$name`` set to ``value`` for the block (for child processes too), then as it was."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield value
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@pytest.fixture(autouse=True, scope="session")
def data_dir(tmp_path_factory):
    """The built-in digits are prepared once per session into a throw-away folder, never ~/.cache."""
    path = tmp_path_factory.mktemp("data")
    with environment("MLO_MAE_DATA_DIR", str(path)):
        yield path


@pytest.fixture(scope="session")
def digits(data_dir):
    """The built-in digits as a prepared data set (prepared on first use, once per session)."""
    from pipelines.catalog import open_dataset

    return open_dataset("digits", log=lambda _line: None)


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """moto's S3-API server for the session (see ``shared_runs.S3Server``), its endpoint and credentials
    exported as a user would (``AWS_ENDPOINT_URL``, ...) before the Ray cluster and the MLflow server
    start, so that every process of the session reaches bucket ``object_store.BUCKET``."""
    from shared_runs import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    # moto answers a presigned URL with a 500 when its authentication is on; MLflow clients otherwise fetch
    # artifacts of an S3-backed server that way, so here they stream them through the server instead.
    streamed = {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}
    with contextlib.ExitStack() as stack:
        for name, value in {**server.env, **streamed}.items():
            stack.enter_context(environment(name, value))
        yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(object_store, tmp_path_factory):
    """One 2-CPU Ray head node for the session, exported as $RAY_ADDRESS: every run a test starts, in this
    process or in a CLI process, joins it instead of starting a cluster of its own (5-10 s each)."""
    from cluster import start_head, stop_cluster

    temp = tmp_path_factory.mktemp("ray")
    with environment("RAY_ADDRESS", start_head(temp)) as address:
        yield {"address": address, "temp": str(temp)}
    import ray

    ray.shutdown()
    stop_cluster(str(temp))


@pytest.fixture(autouse=True, scope="session")
def mlflow_store(tmp_path_factory):
    """Every run the tests start (in this process or in a child) logs to one throw-away sqlite store,
    not to ./mlflow.db; a test about a server passes its own --tracking-uri."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    with environment("MLFLOW_TRACKING_URI", f"sqlite:///{path}") as uri:
        yield uri


@pytest.fixture(scope="session")
def mlflow_server(object_store, tmp_path_factory):
    """``mlflow server`` on loopback (sqlite backend, artifacts proxied to s3://BUCKET/mlflow on the
    session's object store); ``.uri`` waits until it answers."""
    from shared_runs import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), f"s3://{object_store.BUCKET}/mlflow")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sealed_digits(tmp_path_factory):
    """Digits prepared afresh, then every test shard overwritten: reading the test split fails."""
    from shared_runs import seal_digits

    return seal_digits(tmp_path_factory.mktemp("sealed") / "digits")


@pytest.fixture(scope="session")
def reference(mlflow_server, ray_cluster, sealed_digits, tmp_path_factory):
    """The suite's one uninterrupted 2-worker run (see ``shared_runs``), logged to the session's server
    (started first: it comes up while the cluster starts and the data is sealed)."""
    from shared_runs import reference_run

    return reference_run(tmp_path_factory.mktemp("reference") / "runs", sealed_digits, mlflow_server.uri)


@pytest.fixture
def cli_run():
    """``mlo-mae ARGS`` in this process (see ``cli_runner.run_cli``)."""
    return run_cli


def tiny_model() -> ModelConfig:
    """8x8 images, patch 2 (16 patches), 2 narrow blocks: a real but minute MAE."""
    return ModelConfig(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=2, num_heads=2,
                       mlp_ratio=2.0, decoder_embed_dim=12, decoder_depth=1, decoder_num_heads=2,
                       mask_hidden_dim=8)


@pytest.fixture
def tiny_cfg() -> Config:
    cfg = resolve()
    cfg.model = tiny_model()
    cfg.data.batch_mae = cfg.data.batch_head = cfg.data.batch_mask = 6
    return cfg


def random_batches(seed: int, batch: int, start: int = 0, img: int = 8, classes: int = 3,
                   dtype: torch.dtype = torch.float32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream of (images, labels); batch i depends only on (seed, i), so a
    stream resumes at ``start``."""
    for i in itertools.count(start):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        x = torch.randn(batch, 3, img, img, generator=gen, dtype=dtype)
        y = torch.randint(0, classes, (batch,), generator=gen)
        yield x, y


def level_streams(batch: int = 6, dtype: torch.dtype = torch.float32, seed: int = 0,
                  start: dict[str, int] | None = None) -> dict:
    """One stream per level; ``start`` (batches already drawn per level) resumes them."""
    start = start or {}
    return {level: random_batches(seed * 10 + i, batch, start.get(level, 0), dtype=dtype)
            for i, level in enumerate(("mae", "head", "mask"))}

"""Data sets and runs in object storage: a real S3-API server (moto's, see ``shared_runs.S3Server``) reached
as a user reaches one, through ``AWS_ENDPOINT_URL`` and a key in the environment.

The runs that read shards from the bucket and keep their checkpoints there are in
``test_distributed`` (the lost-node run); the MLflow server's artifacts in the bucket in
``test_tracking``. Here: ``prepare`` into a bucket, and what a wrong URI, key or endpoint says.
"""

from __future__ import annotations

import contextlib
import json

import pytest
from shared_runs import free_port

from pipelines.manifest import load_prepared


@pytest.fixture(scope="module")
def bucket(object_store) -> str:
    return f"s3://{object_store.BUCKET}"


def test_prepare_writes_shards_then_the_manifest_to_a_bucket_and_reads_back_as_a_data_set(
        bucket, object_store, digits, cli_run, tmp_path):
    out = f"{bucket}/prepared/digits"
    result = cli_run("prepare", "digits", out, "--shard-rows", "256", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{out}: 10 classes | train 1151, val 287, test 359")
    keys = object_store.keys("prepared/digits/")
    remote = load_prepared(out)
    assert remote.root == out and remote.manifest["name"] == "digits"
    assert sorted(keys) == sorted([f"prepared/digits/{s['file']}" for s in remote.manifest["shards"]]
                                  + ["prepared/digits/manifest.json", "prepared/digits/skipped.jsonl"])
    local = digits.manifest  # the session's local copy, prepared the same way
    assert [s["sha256"] for s in remote.manifest["shards"]] == [s["sha256"] for s in local["shards"]]
    remote.verify()  # every object's bytes against the manifest
    assert remote.files("train")[0] == f"{out}/train/part-00000.parquet"
    assert not list(tmp_path.iterdir())  # nothing left behind locally

    again = cli_run("prepare", "digits", out, "--shard-rows", "256", cwd=tmp_path)
    assert again.returncode == 0 and "already holds this data set" in again.stdout
    other = cli_run("prepare", "digits", out, "--shard-rows", "256", "--seed", "1", cwd=tmp_path)
    assert other.returncode == 2 and "already holds a different data set" in other.stderr
    object_store.s3.put_object(Bucket=object_store.BUCKET, Key="prepared/junk/notes.txt", Body=b"x")
    junk = cli_run("prepare", "digits", f"{bucket}/prepared/junk", cwd=tmp_path)
    assert junk.returncode == 2 and "is not empty and holds no manifest.json" in junk.stderr


def test_a_prefix_without_a_manifest_or_with_a_missing_shard_is_named(bucket, object_store, cli_run):
    none = cli_run("pretrain", "--dataset", f"{bucket}/nothing-here")
    assert none.returncode == 2
    assert none.stderr.strip() == (f"mlo-mae: error: --dataset: '{bucket}/nothing-here' is not a prepared data set "
                                   f"(no manifest.json); run 'mlo-mae prepare SOURCE {bucket}/nothing-here' first")
    manifest = {"format": "mlo-mae/parquet-v1", "shards": [{"file": "train/part-00000.parquet", "split": "train"}],
                "counts": {"train": {"total": 1}, "val": {"total": 1}}}
    object_store.s3.put_object(Bucket=object_store.BUCKET, Key="torn/manifest.json", Body=json.dumps(manifest))
    torn = cli_run("pretrain", "--dataset", f"{bucket}/torn")
    assert torn.returncode == 2
    assert "shard train/part-00000.parquet listed in manifest.json is missing" in torn.stderr


COMMANDS = {"pretrain-storage": ["pretrain", "--storage-path", "{uri}"], "pretrain-dataset": ["pretrain", "--dataset", "{uri}"],
            "tune-storage": ["tune", "--storage-path", "{uri}"], "prepare-out": ["prepare", "digits", "{uri}"]}


# every command and every fault at least once (an endpoint that refuses costs pyarrow's ~6 s of retries)
@pytest.mark.parametrize("command,fault", [("pretrain-storage", "no bucket"), ("pretrain-storage", "wrong key"),
                                           ("pretrain-storage", "no server"), ("pretrain-dataset", "wrong key"),
                                           ("tune-storage", "no bucket"), ("prepare-out", "no server"),
                                           ("prepare-out", "wrong key")])
def test_an_unusable_object_store_is_one_line_naming_the_uri_and_exit_2(command, fault, object_store, cli_run,
                                                                      monkeypatch, tmp_path):
    """Before anything starts (no Ray, no MLflow run), in seconds: a missing bucket, a secret key the
    server refuses, an endpoint where nothing listens."""
    uri = f"s3://{object_store.BUCKET}/runs"
    if fault == "no bucket":
        uri = "s3://no-such-bucket/runs"
    elif fault == "wrong key":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    result = cli_run(*[a.format(uri=uri) for a in COMMANDS[command]], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"'{uri}'" in lines[0], result.stderr
    expected = {"no bucket": "bucket 'no-such-bucket' does not exist", "wrong key": "ACCESS_DENIED",
                "no server": "cannot be reached"}[fault]
    assert expected in lines[0], lines[0]
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_one_filesystem_serves_a_bucket_until_its_settings_change(bucket, object_store, monkeypatch):
    from pipelines.location import filesystem

    object_store.s3.put_object(Bucket=object_store.BUCKET, Key="fs-cache/a/one.txt", Body=b"1")
    fs, path = filesystem(f"{bucket}/fs-cache/a/one.txt")
    again, folder = filesystem(f"{bucket}/fs-cache/a/")
    assert again is fs  # not a new client (and region lookup) for every chunk read
    assert (path, folder) == (f"{object_store.BUCKET}/fs-cache/a/one.txt", f"{object_store.BUCKET}/fs-cache/a")
    assert fs.get_file_info(path).size == 1 and again.open_input_stream(path).read() == b"1"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "changed")
    assert filesystem(f"{bucket}/fs-cache/a/one.txt")[0] is not fs  # new settings, new client


def test_a_prepare_that_fails_after_uploading_shards_leaves_the_prefix_empty(bucket, object_store, tmp_path):
    from data_factory import make_image_folder

    from pipelines.prepare import PrepareError, prepare

    src = tmp_path / "src"
    make_image_folder(src, per_class=20)
    seen = []

    class SpoilAfterFirstShard(contextlib.AbstractContextManager):
        def __init__(self, phase: str, total: int) -> None:
            self.phase = phase

        def update(self, n: int) -> None:  # a shard is written and uploaded: now every JPEG changes
            if self.phase.startswith("writing") and not seen:
                seen.extend(object_store.keys("midway/"))
                for f in src.rglob("*.jpg"):
                    f.write_bytes(b"changed")

        def __exit__(self, *exc) -> None:
            return None

    with pytest.raises(PrepareError, match="changed while it was being prepared; run prepare again"):
        prepare(str(src), f"{bucket}/midway", progress=SpoilAfterFirstShard, log=lambda _: None, jobs=1,
                shard_rows=10)
    assert seen and all(k.endswith(".parquet") for k in seen)  # it had uploaded shards...
    assert [k for k in object_store.keys("midway/") if k != "midway/"] == []  # ...and removed them (a folder
    # marker may stay) so that running prepare again works
    seen.append("no more spoiling")
    manifest = prepare(str(src), f"{bucket}/midway", progress=SpoilAfterFirstShard, log=lambda _: None, jobs=1,
                       shard_rows=10)
    assert manifest["skipped"]["by_reason"]["not an image"] >= 30  # the JPEGs spoiled above

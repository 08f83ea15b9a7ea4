"""Runs recorded in a real `mlflow server` (sqlite backend, proxied artifacts, loopback, a free port),
read back through `MlflowClient` as a user of the MLflow UI would see them: the session's 2-worker
reference run (``shared_runs``; ``test_distributed`` compares its faulted runs with it) and a baseline run.

The data set is a copy of the built-in digits whose test shards are overwritten
with garbage after preparation: a pretrain run and every fine-tuning epoch
complete on it, so nothing reads the test split before the final evaluation.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import run_cli
from shared_runs import RUN_ID, STEPS, free_port
from PIL import Image

from mlo_mae.config import resolve
from mlo_mae.export import load_encoder
from mlo_mae.heatmaps import CLASSES_SIZE, MEAN_SIZE, PANEL_SIZE
from pipelines.manifest import load_prepared
from training import tracking
from training.pretrained import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
BASELINE_STEPS = 2
EVALUATIONS = {"mlo": [0, 4, STEPS], "base": [0, BASELINE_STEPS]}  # every 4 (mlo), 2 (base), and the end
pytestmark = pytest.mark.usefixtures("ray_cluster")  # the runs join the session's cluster


def mlo_mae(*args, cwd):
    """The command in this process (module fixtures cannot take the cli_run fixture)."""
    return run_cli(*args, cwd=cwd)


@pytest.fixture(scope="module")
def runs(reference):
    """The session's MLO-MAE reference run (2 workers, see ``shared_runs``) and a short 1-worker baseline run
    beside it, both on the sealed data and logged to the session's ``mlflow server``."""
    cwd = reference["storage"].parent
    base = mlo_mae("pretrain", "--name", "base", "--baseline", "--storage-path", reference["storage"],
                   "--max-steps", str(BASELINE_STEPS), "--batch-size", "16", "--dataset", str(reference["data"]),
                   "-o", "run.eval_every=2", "-o", "run.eval_samples=32", "-o", "run.probe=false",
                   "--tracking-uri", reference["uri"], "--experiment", "tracked", cwd=cwd)
    assert base.returncode == 0, base.stderr
    return {"uri": reference["uri"], "ids": {"mlo": reference["run_id"], "base": RUN_ID.search(base.stdout).group(1)},
            "stdout": {"mlo": reference["result"].stdout, "base": base.stdout}, "cwd": cwd,
            "storage": reference["storage"], "data": reference["data"]}


def test_a_run_prints_its_shape_saves_its_state_and_keeps_its_name(runs, cli_run):
    assert ("1 worker(s) | global batch 16 (= 1 x 16 per worker) | lr scaling 'linear' x1: lr_mae 0.0003, "
            "lr_head 0.01, lr_mask 0.001") in runs["stdout"]["base"].splitlines()
    lines = runs["stdout"]["mlo"].splitlines()
    assert ("2 worker(s) | global batch 32 (= 2 x 16 per worker) | lr scaling 'linear' x2: lr_mae 0.0006, "
            "lr_head 0.02, lr_mask 0.002") in lines
    assert any(line.startswith(f"step {STEPS}/{STEPS} | L_I ") and "L_III" in line and "ETA" in line
               and "img/s" in line for line in lines)
    run_dir = runs["storage"] / "reference"
    final = Path(runs["stdout"]["mlo"].split("final checkpoint: ", 1)[1].splitlines()[0].strip())
    assert final.parent == run_dir
    state = torch.load(final / "state.pt", weights_only=True)
    assert state["engine"]["iteration"] == STEPS
    assert state["engine"]["level_steps"] == {"mae": 2 * STEPS, "head": 4 * STEPS, "mask": STEPS}  # 4 C steps
    assert yaml.safe_load((run_dir / "mlo-mae-run.yaml").read_text())["config"]["run"]["max_steps"] == STEPS
    storage = ["--storage-path", runs["storage"]]
    again = cli_run("pretrain", *storage, "--max-steps", "3", "--name", "reference", cwd=runs["cwd"])
    assert again.returncode == 2 and "run 'reference' already exists" in again.stderr
    missing = cli_run("pretrain", *storage, "--resume", "nothing", cwd=runs["cwd"])
    assert missing.returncode == 2 and "--resume: no run 'nothing'" in missing.stderr
    mixed = cli_run("pretrain", *storage, "--resume", "reference", "--seed", "3", cwd=runs["cwd"])
    assert mixed.stderr == "mlo-mae: error: --resume continues a run with its saved settings; drop --seed\n"


def _client(uri):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _files(client, run_id, path=None):
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _files(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_params_tags_and_per_level_metrics(runs):
    client = _client(runs["uri"])
    run = client.get_run(runs["ids"]["mlo"])
    assert run.info.status == "FINISHED" and run.info.run_name == "reference"
    params, tags = run.data.params, run.data.tags
    assert params["mlo.mask_ratio"] == "0.75" and params["model.embed_dim"] == "192"
    assert params["data.batch_mae"] == "16" and params["run.max_steps"] == str(STEPS)
    assert params["dataset.name"] == "digits" and params["dataset.classes"] == "10"
    assert params["dataset.test_images"] == "359" and params["total_iterations"] == str(STEPS)
    assert tags["mlo_mae.kind"] == "pretrain" and tags["mlo_mae.mode"] == "mlo" and tags["mlo_mae.preset"] == "tiny"
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["mlflow.source.git.commit"])
    assert tags["version.torch"] == torch.__version__.split("+")[0] or tags["version.torch"] == torch.__version__
    assert Path(tags["mlo_mae.checkpoint"]).parent == runs["storage"] / "reference"
    assert params["workers"] == "2" and params["global_batch"] == "32"
    # where the workers ran (tags: a restarted group may move); the session's cluster is one node
    assert tags["ray.nodes"] == "1" and tags["ray.node.rank0"] == tags["ray.node.rank1"]
    assert re.fullmatch(r"[0-9a-f]{56}", tags["ray.node.rank0"])
    for key in ("train/loss_mae", "train/loss_head", "train/loss_val", "train/hypergrad_norm", "mask/entropy",
                "mask/ratio", "mask/saturated", "mask/mean_prob_masked", "lr/mae", "lr/head", "lr/mask",
                "perf/images_per_s", "perf/data_wait", "hypergrad/path_ratio"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1)), key  # log_every 1: every step
    assert all(m.value == 0.75 for m in client.get_metric_history(run.info.run_id, "mask/ratio"))
    for key in ("eval/val_top1", "mask/jaccard", "mask/jaccard_random", "mask/saturated_eval",
                "mask/mean_prob_masked_eval"):
        evals = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in evals) == EVALUATIONS["mlo"] and all(0 <= m.value <= 1 for m in evals), key
    assert run.data.metrics["mask/jaccard_random"] == pytest.approx(0.601, abs=1e-3)  # 48 of 64 patches
    baseline = client.get_run(runs["ids"]["base"])
    assert baseline.data.tags["mlo_mae.mode"] == "baseline"
    for key in ("train/loss_val", "mask/entropy", "mask/saturated", "mask/saturated_eval", "hypergrad/path_ratio"):
        assert key not in baseline.data.metrics, key
    assert baseline.data.metrics["mask/ratio"] == 0.75
    assert abs(baseline.data.metrics["mask/jaccard"] - 0.601) < 0.05  # uniformly random masks
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(runs["cwd"]))
    assert "mask_ratio: 0.75" in Path(config).read_text()


@pytest.mark.parametrize("name", ["mlo", "base"])
def test_heatmaps_at_every_evaluation_decode_at_their_size(runs, name, tmp_path):
    client = _client(runs["uri"])
    run_id = runs["ids"][name]
    files = _files(client, run_id)
    sizes = {"mask_mean": MEAN_SIZE, "mask_panel": PANEL_SIZE, "mask_classes": CLASSES_SIZE}
    for kind, size in sizes.items():
        pngs = [f for f in files if f.startswith(f"images/heatmaps~{kind}+step+") and f.endswith(".png")]
        steps = sorted(int(re.search(r"\+step\+(\d+)\+", f).group(1)) for f in pngs)
        assert steps == EVALUATIONS[name], (kind, files)
        local = client.download_artifacts(run_id, pngs[-1], str(tmp_path))
        with Image.open(local) as image:
            image.load()
            assert image.size == size and image.mode == "RGB"
        # The same figures under readable names: one per evaluation, and the last one as the final figure.
        assert [f"heatmaps/{kind}/step-{step:06d}.png" for step in steps if
                f"heatmaps/{kind}/step-{step:06d}.png" not in files] == [], files
        assert f"heatmaps/final/{kind}.png" in files
    with Image.open(client.download_artifacts(run_id, "heatmaps/final/mask_panel.png", str(tmp_path))) as final:
        assert final.size == PANEL_SIZE
    gif = client.download_artifacts(run_id, "heatmaps/mask_evolution.gif", str(tmp_path))
    with Image.open(gif) as animation:
        assert animation.n_frames == len(EVALUATIONS[name])
    assert "heatmaps/mask_strip.png" in files


def test_the_servers_artifacts_are_objects_in_the_bucket(runs, object_store):
    """The session's server keeps artifacts in s3://BUCKET/mlflow (--artifacts-destination): what the API
    listed and served above are objects there, the heatmaps and the exported encoder among them."""
    client = _client(runs["uri"])
    run_id = runs["ids"]["mlo"]
    experiment = client.get_run(run_id).info.experiment_id
    stored = set(object_store.keys(f"mlflow/{experiment}/{run_id}/artifacts/"))
    listed = {f"mlflow/{experiment}/{run_id}/artifacts/{f}" for f in _files(client, run_id)}
    assert listed == stored and len(stored) > 20
    for name in ("heatmaps/final/mask_panel.png", "heatmaps/mask_evolution.gif", "model/encoder.safetensors"):
        assert f"mlflow/{experiment}/{run_id}/artifacts/{name}" in stored


def test_encoder_artifact_loads_into_timm_and_matches_the_checkpoint(runs, tmp_path):
    client = _client(runs["uri"])
    run_id = runs["ids"]["mlo"]
    folder = client.download_artifacts(run_id, "model", str(tmp_path))
    model = load_encoder(folder).eval()  # strict: every encoder key, nothing else
    pretrained = load_pretrained(run_id, runs["uri"])
    assert pretrained.iteration == STEPS
    mae = pretrained.encoder().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), mae.forward_features(x), atol=1e-5)
        assert model(x).shape == (3, 192)  # num_classes=0: the pooled CLS feature
        classifier = load_encoder(folder, with_head=True).eval()  # with C, its BatchNorm folded in
        assert classifier(x).shape == (3, 10)


def test_runs_table_lists_the_runs(runs):
    result = mlo_mae("runs", "--tracking-uri", runs["uri"], "--experiment", "tracked", cwd=runs["cwd"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "2 pretrain run(s)" in lines[0]
    header = lines[1].split()
    assert header[:4] == ["run", "name", "mode", "preset"]
    rows = {line.split()[1]: line.split() for line in lines[2:]}
    assert rows["reference"][0] == runs["ids"]["mlo"][:8] and rows["reference"][2] == "mlo"
    assert rows["base"][2] == "baseline" and rows["base"][8] == "FINISHED"
    missing = mlo_mae("runs", "--tracking-uri", runs["uri"], "--experiment", "nope", cwd=runs["cwd"])
    assert missing.returncode == 2 and "no experiment 'nope'" in missing.stderr


def test_probe_and_finetune_log_child_runs(runs):
    uri, parent = runs["uri"], runs["ids"]["mlo"]
    client = _client(uri)
    probe = mlo_mae("probe", parent, "--dataset", "digits", "--tracking-uri", uri, cwd=runs["cwd"])
    assert probe.returncode == 0, probe.stderr
    assert "linear probe of cls features: D_val top-1" in probe.stdout
    finetune = mlo_mae("finetune", parent, "--dataset", "digits", "--epochs", "1", "--tracking-uri", uri,
                       cwd=runs["cwd"])
    assert finetune.returncode == 0, finetune.stderr
    children = {r.data.tags["mlo_mae.kind"]: r for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")}
    assert set(children) == {"probe", "finetune"}
    assert 0.3 < children["probe"].data.metrics["test_top1"] <= 1.0  # 10 classes
    history = client.get_metric_history(children["finetune"].info.run_id, "val_top1")
    assert sorted(m.step for m in history) == [1]
    assert "test_top1" in children["finetune"].data.metrics
    metrics = client.get_run(parent).data.metrics
    assert metrics["probe/test_top1"] == children["probe"].data.metrics["test_top1"]
    assert metrics["finetune/test_top1"] == children["finetune"].data.metrics["test_top1"]


def test_test_split_is_read_only_after_the_last_epoch(runs):
    """On the sealed data, fine-tuning completes every epoch, then fails on the test split, and only there."""
    result = mlo_mae("finetune", runs["ids"]["mlo"], "--epochs", "2", "--tracking-uri", runs["uri"],
                     cwd=runs["cwd"])
    assert result.returncode == 1
    assert [line.split(" |")[0] for line in result.stdout.splitlines() if line.startswith("epoch ")] == \
        ["epoch 1/2", "epoch 2/2"]
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("mlo-mae: error: ") and "test" in error[0]
    client = _client(runs["uri"])
    failed = client.search_runs([client.get_run(runs["ids"]["mlo"]).info.experiment_id],
                                filter_string="tags.mlo_mae.kind = 'finetune' and attributes.status = 'FAILED'")
    assert len(failed) == 1 and "test_top1" not in failed[0].data.metrics


def test_bad_sources_are_one_line_errors(runs, tmp_path):
    for source, needle in ((str(tmp_path), "holds no complete checkpoint"),
                           ("0" * 32, "not found"), ("nonsense", "neither an existing checkpoint")):
        result = mlo_mae("probe", source, "--tracking-uri", runs["uri"], cwd=runs["cwd"])
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr


def test_copy_of_data_is_sealed(sealed_digits):
    """The premise of the tests above: the sealed copy's test split cannot be read."""
    from pipelines.plan import read_rows

    with pytest.raises(Exception, match="Parquet|parquet|magic"):
        read_rows(str(sorted((sealed_digits / "test").glob("*.parquet"))[0]), 0)


# ----------------------------------------------------------------------------- the store, checked before a run


def _one_line_error(uri: str, timeout_s: float = 5.0) -> str:
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.check_store(uri, timeout_s)
    assert time.monotonic() - start < 15
    message = str(caught.value)
    assert "\n" not in message and uri in message and len(message) < 300, message
    return message


def test_an_unreachable_server_fails_in_seconds_with_one_line():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert "connection refused; is `mlflow server` running there?" in _one_line_error(uri)


def test_a_server_that_never_answers_fails_at_the_timeout():
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert "no answer within 1 s" in _one_line_error(uri, timeout_s=1.0)


def test_a_live_server_passes_the_check(mlflow_server):
    tracking.check_store(mlflow_server.uri)


def test_bad_sqlite_folders_fail_with_one_line(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    assert "is a file; expected a folder" in _one_line_error(f"sqlite:///{tmp_path}/a-file/runs/mlflow.db")
    assert "is a folder; expected a database file" in _one_line_error(f"sqlite:///{tmp_path}")
    tracking.check_store(f"sqlite:///{tmp_path}/new/folders/mlflow.db")  # MLflow creates the folders


def test_mlflow_http_calls_do_not_retry_for_minutes(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's own setting wins
    tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


# ----------------------------------------------------------------------------- what the run page shows


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('local-store') / 'mlflow.db'}"


def test_experiments_open_on_runs_not_traces(local_store):
    client = tracking.client(local_store)
    created = tracking.experiment_id(client, "new")
    assert client.get_experiment(created).tags["mlflow.experimentKind"] == "custom_model_development"
    older = client.create_experiment("made-before-the-tag")
    assert tracking.experiment_id(client, "made-before-the-tag", create=False) == older
    assert "mlflow.experimentKind" not in client.get_experiment(older).tags  # only looking: left alone
    assert tracking.experiment_id(client, "made-before-the-tag") == older
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"


def test_links_open_the_model_training_view(local_store):
    """MLflow 3.17's UI ignores the kind tag for its landing view; the link's workflowType decides."""
    run_id = tracking.start_run(local_store, "linked", "run", "probe", resolve(), {})
    experiment = tracking.client(local_store).get_run(run_id).info.experiment_id
    assert tracking.run_link(local_store, run_id) == \
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
    assert tracking.ui_link("http://host:5000/", "7") == "http://host:5000/#/experiments/7?workflowType=machine_learning"


def test_a_run_has_its_source_and_its_data_set(local_store, sealed_digits):
    data = load_prepared(sealed_digits)
    run_id = tracking.start_run(local_store, "sources", "run", "pretrain", resolve(), {}, dataset=data)
    run = tracking.client(local_store).get_run(run_id)
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "mlo-mae pretrain" and tags["mlflow.source.type"] == "LOCAL"
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["mlflow.source.git.commit"])
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.name == data.manifest["name"] == "digits"
    assert used.dataset.digest == tracking.dataset_digest(data.manifest)
    assert json.loads(used.dataset.source) == {"uri": str(sealed_digits.resolve())}
    assert json.loads(used.dataset.profile)["test_images"] == 359
    assert [(t.key, t.value) for t in used.tags] == [("mlflow.data.context", "train")]


def test_the_data_set_digest_follows_the_shards_not_the_preparation_time(sealed_digits):
    manifest = load_prepared(sealed_digits).manifest
    digest = tracking.dataset_digest(manifest)
    assert tracking.dataset_digest({**manifest, "created": "another day", "seconds": 99}) == digest
    changed = [dict(manifest["shards"][0], sha256="0" * 64), *manifest["shards"][1:]]
    assert tracking.dataset_digest({**manifest, "shards": changed}) != digest

"""The `mlo-mae` command: its entry point in this process (exit codes, output), and as a real process
where the process itself is under test (imports, start-up time)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("ray_cluster")


def mlo_mae(*args, cwd=None, env=None):
    """The command as a user starts it: a new Python process."""
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600, env=env)


def assert_one_line_error(result, needle):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mlo-mae: error: ")
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args,needle", [
    (["pretrain", "--no-such-flag"], "No such option '--no-such-flag'"),
    (["pretrain", "--preset", "huge"], "'huge' is not one of"),
    (["pretrain", "--mask-ratio", "1.5"], "--mask-ratio"),
    (["pretrain", "--max-steps", "zero"], "--max-steps"),
    (["pretrain", "-o", "optim.lr_maee=1e-3"], "unknown config key 'optim.lr_maee'"),
    (["pretrain", "-o", "mlo.unroll_mae"], "must look like section.key=value"),
    (["pretrain", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["pretrain", "--dataset", "imagenet"], "--dataset: 'imagenet' is not a prepared data set"),
    (["pretrain", "--precision", "bf16", "--device", "cpu"], "bf16 needs a CUDA device"),
    (["pretraim"], "No such command 'pretraim'"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, tmp_path, cli_run):
    assert_one_line_error(cli_run(*args, cwd=tmp_path), needle)


BLOCK_HEAVY = """
import sys
for name in ("torch", "ray", "mlflow", "pyarrow"):
    sys.modules[name] = None  # importing any of them now fails
sys.argv = ["mlo-mae", *sys.argv[1:]]
from cli import main
main()
"""


@pytest.mark.parametrize("args,needle", [
    (["pretrain", "--dataset", "/nonexistent"], "--dataset: '/nonexistent' is not a prepared data set"),
    (["pretrain", "--mask-ratio", "1.5"], "--mask-ratio"),
    (["pretrain", "--tracking-uri", "http://127.0.0.1:9"], "cannot reach the MLflow tracking server at "
                                                             "http://127.0.0.1:9"),
    (["probe", "not-a-run"], "SOURCE 'not-a-run' is neither"),
    (["tune", "--space", "missing.yaml"], "--space: "),
])
def test_mistakes_are_refused_before_torch_ray_or_mlflow_load(args, needle, tmp_path):
    """A real process in which torch, Ray, MLflow and pyarrow cannot be imported: the error comes first."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", BLOCK_HEAVY, *args], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert_one_line_error(result, needle)
    assert time.monotonic() - started < 60  # seconds under load, not the minutes of a retrying client


def test_bad_key_in_config_file_names_file_and_key(tmp_path, cli_run):
    f = tmp_path / "my.yaml"
    f.write_text("optim:\n  lr_head: 1e-3\n  lr_mask_: 1e-3\n")
    assert_one_line_error(cli_run("pretrain", "--config", str(f)),
                          f"{f}: unknown config key 'optim.lr_mask_' (did you mean 'optim.lr_mask'?)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, cli_run, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS")  # on a cluster the workers would decide
    assert_one_line_error(cli_run("pretrain", "--device", "cuda", "--max-steps", "1", cwd=tmp_path),
                          "no CUDA device is available")


def test_print_config_round_trips_into_config(tmp_path, cli_run):
    first = cli_run("pretrain", "--preset", "small", "--mask-ratio", "0.6", "--baseline",
                    "-o", "optim.lr_mask=3e-4", "--print-config")
    assert first.returncode == 0, first.stderr
    data = yaml.safe_load(first.stdout)
    assert data["preset"] == "small" and data["mlo"]["mask_ratio"] == 0.6 and data["mlo"]["baseline"] is True
    assert data["optim"]["lr_mask"] == 3e-4
    f = tmp_path / "resolved.yaml"
    f.write_text(first.stdout)
    second = cli_run("pretrain", "--config", str(f), "--print-config")
    assert second.stdout == first.stdout


def test_help_shows_defaults(cli_run):
    out = " ".join(cli_run("pretrain", "--help").stdout.split())
    for text in ("default 0.75", "default fd", "default auto", "--print-config", "--workers", "[default: 1]",
                 "--cpus-per-worker", "--gpus-per-worker", "--address", "$RAY_ADDRESS", "--storage-path",
                 "[default: ray_results]", "NFS or s3://", "--name", "--resume NAME", "--tracking-uri",
                 "$MLFLOW_TRACKING_URI", "sqlite:///./mlflow.db", "--experiment", "[default: mlo-mae]"):
        assert text in out, text
    finetune = " ".join(cli_run("finetune", "--help").stdout.split())
    for text in ("SOURCE", "MLflow run id", "--epochs", "[default: 100;", "--lr", "[default: 0.0001;",
                 "--layer-decay", "--drop-path", "--label-smoothing", "test split is read once"):
        assert text in finetune, text
    assert "linear probe" in " ".join(cli_run("probe", "--help").stdout.split()).lower()
    assert "[default: 50;" in " ".join(cli_run("runs", "--help").stdout.split())

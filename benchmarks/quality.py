"""Does the learned masking help? Plain MAE, the paper's MLO-MAE and this project's MLO-MAE, with the
same preset, iterations, Stage-I images and seeds, on one prepared data set.

    python benchmarks/quality.py                               # digits, tiny preset, 3 arms x seeds 0 1 2
    python benchmarks/quality.py --name fmnist --dataset ~/data/fmnist-pq --preset tiny-28 \\
        --max-steps 500 --finetune-epochs 1                   # Fashion-MNIST (mlo-mae prepare /usr/share/...)
    python benchmarks/quality.py --name fmnist                 # after a stop: finished runs are kept

Arms: ``mae`` (``--baseline``), ``paper`` (``--config paper``: the paper's method with the authors'
per-step settings) and ``mlo`` (this project's defaults). Each run is a real ``mlo-mae pretrain``
(Ray Train, MLflow; the linear probe at the end) followed by a short ``mlo-mae finetune``. Every
finished run is saved at once in ``benchmarks/results/quality-NAME/runs/``, so a stopped study
resumes where it was (a half-done pretrain continues from its checkpoint). The end prints the table
(mean ± sd over seeds, the paired per-seed differences against MAE, the mask metrics at the end) and
writes it to ``table.md`` and ``summary.json``. Arguments after ``--`` go to every pretrain.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUN_ID = re.compile(r"^MLflow run ([0-9a-f]{32}) ", re.M)
ARMS = {"mae": ["--baseline"], "paper": ["--config", "paper"], "mlo": []}
ARM_NAMES = {"mae": "MAE (`--baseline`)", "paper": "MLO-MAE, paper-faithful (`--config paper`)",
             "mlo": "MLO-MAE, this project's defaults"}
SETTINGS = ("dataset", "preset", "max_steps", "seeds", "arms", "finetune_epochs", "finetune_lr", "extra")
# What each run records (MLflow metric -> field), last value of the run.
METRICS = {"probe/test_top1": "probe_test", "probe/val_top1": "probe_val", "finetune/test_top1": "finetune_test",
           "finetune/val_top1": "finetune_val", "eval/val_top1": "head_val", "mask/jaccard": "jaccard",
           "mask/jaccard_random": "jaccard_random", "mask/saturated_eval": "saturated",
           "mask/mean_prob_masked_eval": "mean_prob_masked", "mask/entropy": "entropy",
           "train/loss_mae": "loss_mae", "train_seconds": "train_seconds"}


def cli(args: list[str], log: Path) -> str:
    """``mlo-mae ARGS`` in the results folder (its MLflow artifacts land there); output to ``log``, the
    evaluation lines echoed as progress. Returns stdout; a failure ends the study with its last line."""
    command = [sys.executable, str(ROOT / "cli.py"), *args]
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, cwd=RESULTS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # progress as it happens
        lines = []
        for line in proc.stdout:
            out.write(line)
            lines.append(line)
            if line.startswith(("evaluation at step", "linear probe", "fine-tuned")):
                print(f"    {line.rstrip()}", flush=True)
        if proc.wait() != 0:
            sys.exit(f"quality: '{' '.join(args[:2])}' failed ({proc.returncode}): {lines[-1].strip() if lines else ''}"
                     f" (whole output: {log})")
    return "".join(lines)


def recorded(uri: str, run_id: str) -> dict:
    """The run's numbers from MLflow under the benchmark's names."""
    import mlflow

    metrics = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
    return {field: metrics.get(key) for key, field in METRICS.items()}


def pretrain(study: Path, settings: dict, arm: str, seed: int, uri: str) -> dict:
    """Pretrain one arm at one seed (or continue it from its checkpoint); the record of its MLflow run."""
    name = f"{study.name}-{arm}-s{seed}"
    log = study / "runs" / f"{arm}-s{seed}.log"
    storage = RESULTS / "ray_results"
    if (storage / name).exists():  # stopped half-way: continue from its checkpoint, into the same MLflow run
        out = cli(["pretrain", "--resume", name, "--storage-path", str(storage)], log)
    else:
        out = cli(["pretrain", "--dataset", settings["dataset"], "--preset", settings["preset"],
                   "--max-steps", str(settings["max_steps"]), "--seed", str(seed), *ARMS[arm], "--name", name,
                   "--storage-path", str(storage), "--tracking-uri", uri, "--experiment", "quality",
                   *settings["extra"]], log)
    run_id = RUN_ID.search(out).group(1)
    return {"arm": arm, "seed": seed, "name": name, "run_id": run_id, **recorded(uri, run_id)}


def finetune(study: Path, settings: dict, record: dict, uri: str) -> dict:
    """The short fine-tune of a pretrained run (a child run in MLflow); the record with its numbers."""
    ft = settings["finetune"]
    cli(["finetune", record["run_id"], "--epochs", str(ft["epochs"]), "--lr", str(ft["lr"]),
         "--warmup-epochs", str(ft["warmup_epochs"]), "--layer-decay", str(ft["layer_decay"]),
         "--batch-size", str(ft["batch_size"]), "--seed", str(record["seed"]), "--tracking-uri", uri,
         "--experiment", "quality"], study / "runs" / f"{record['arm']}-s{record['seed']}.log")
    return {**record, **recorded(uri, record["run_id"]), "finetune_settings": ft}


def mean_sd(values: list[float | None], scale: float = 100.0, digits: int = 2) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:  # one seed has no spread to show
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarise(rows: list[dict], arms: list[str], seeds: list[int]) -> tuple[str, dict]:
    """The markdown table and its numbers: per arm mean ± sd, and paired differences against MAE."""
    by = {(r["arm"], r["seed"]): r for r in rows}
    summary: dict = {}
    lines = ["| arm | seeds | probe test top-1 | fine-tune test top-1 | Δ probe vs MAE (paired) | "
             "Δ fine-tune vs MAE (paired) | C D_val top-1 | mask Jaccard (random) | saturated | mean p masked |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        mine = [by[arm, s] for s in seeds if (arm, s) in by]
        entry = {"seeds": [r["seed"] for r in mine]}
        for field in ("probe_test", "finetune_test", "head_val", "jaccard", "jaccard_random", "saturated",
                      "mean_prob_masked"):
            entry[field] = [r[field] for r in mine]
        deltas = {}
        for field in ("probe_test", "finetune_test"):
            pairs = [(by[arm, s][field], by["mae", s][field]) for s in seeds
                     if (arm, s) in by and ("mae", s) in by and by[arm, s][field] is not None
                     and by["mae", s][field] is not None]
            deltas[field] = [a - b for a, b in pairs]
            entry[f"delta_{field}"] = deltas[field]
        summary[arm] = entry
        paired = {f: (mean_sd(d) + " (" + ", ".join(f"{100 * x:+.1f}" for x in d) + ")") if arm != "mae" and d
                  else "-" for f, d in deltas.items()}
        jac = mean_sd(entry["jaccard"], 1, 3)
        rand = statistics.mean(v for v in entry["jaccard_random"] if v is not None) if any(
            v is not None for v in entry["jaccard_random"]) else None
        lines.append(f"| {ARM_NAMES.get(arm, arm)} | {len(mine)} | {mean_sd(entry['probe_test'])} | "
                     f"{mean_sd(entry['finetune_test'])} | {paired['probe_test']} | {paired['finetune_test']} | "
                     f"{mean_sd(entry['head_val'])} | {jac}{f' ({rand:.3f})' if rand is not None else ''} | "
                     f"{mean_sd(entry['saturated'], 100, 1) if arm != 'mae' else '-'} | "
                     f"{mean_sd(entry['mean_prob_masked'], 1, 3) if arm != 'mae' else '-'} |")
    return "\n".join(lines), summary


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help="study name; an existing one resumes with its own settings "
                                       "[default: quality-DATE-TIME]")
    parser.add_argument("--dataset", default="digits", help="'digits' or a folder written by mlo-mae prepare")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--max-steps", type=int, default=180, help="iterations of every run (same for all arms)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--finetune-epochs", type=int, default=1, help="0: no fine-tuning")
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--tracking-uri", default=None, help="[default: sqlite in the study folder]")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    study = RESULTS / f"quality-{args.name or time.strftime('%Y%m%d-%H%M%S')}"
    settings_file = study / "settings.json"
    given = {k: v for k, v in {**vars(args), "extra": extra}.items() if k in SETTINGS}
    if settings_file.is_file():
        settings = json.loads(settings_file.read_text())
        changed = [k for k in SETTINGS if any(f"--{k.replace('_', '-')}" == a.split("=")[0] for a in argv)
                   and given[k] != settings[k]] + (["-- arguments"] if extra and extra != settings["extra"] else [])
        if changed:
            sys.exit(f"quality: study '{study.name}' was started with other {', '.join(changed)} "
                     f"(see {settings_file}); give another --name")
        print(f"resuming {study.name}: {settings}", flush=True)
    else:
        settings = given
        if settings["dataset"] != "digits":
            settings["dataset"] = str(Path(settings["dataset"]).expanduser().resolve())
        (study / "runs").mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    uri = args.tracking_uri or f"sqlite:///{study / 'mlflow.db'}"
    plan = [(arm, seed) for seed in settings["seeds"] for arm in settings["arms"]]
    # A short fine-tune from a fresh head: warmup, then a cosine, lower layers damped (MAE's layer decay).
    settings["finetune"] = {"epochs": settings["finetune_epochs"], "lr": settings["finetune_lr"],
                            "warmup_epochs": 0.1, "layer_decay": 0.75, "batch_size": 128}
    rows = []
    for k, (arm, seed) in enumerate(plan, 1):
        path = study / "runs" / f"{arm}-s{seed}.json"
        row = json.loads(path.read_text()) if path.is_file() else None
        if row is None:
            print(f"[{k}/{len(plan)}] {arm} seed {seed}: pretraining ({path.with_suffix('.log')})", flush=True)
            started = time.perf_counter()
            row = {**pretrain(study, settings, arm, seed, uri), "pretrain_seconds": time.perf_counter() - started}
            path.write_text(json.dumps(row, indent=2) + "\n")
            print(f"[{k}/{len(plan)}] {arm} seed {seed}: probe test {100 * row['probe_test']:.1f}%, "
                  f"Jaccard {row['jaccard']:.3f} | {row['pretrain_seconds'] / 60:.1f} min", flush=True)
        if settings["finetune_epochs"] and row.get("finetune_settings") != settings["finetune"]:
            print(f"[{k}/{len(plan)}] {arm} seed {seed}: fine-tuning", flush=True)
            started = time.perf_counter()
            row = {**finetune(study, settings, row, uri), "finetune_seconds": time.perf_counter() - started}
            path.write_text(json.dumps(row, indent=2) + "\n")
            print(f"[{k}/{len(plan)}] {arm} seed {seed}: fine-tune test {100 * row['finetune_test']:.1f}% | "
                  f"{row['finetune_seconds'] / 60:.1f} min", flush=True)
        rows.append(row)
    table, summary = summarise(rows, settings["arms"], settings["seeds"])
    header = (f"{settings['dataset']} | preset {settings['preset']} | {settings['max_steps']} iterations | "
              f"seeds {' '.join(map(str, settings['seeds']))} | fine-tune {settings['finetune_epochs']} epoch(s) "
              f"at lr {settings['finetune_lr']:g}"
              f"{' | ' + ' '.join(settings['extra']) if settings['extra'] else ''}")
    (study / "table.md").write_text(f"{header}\n\n{table}\n")
    (study / "summary.json").write_text(json.dumps({"settings": settings, "arms": summary, "runs": rows},
                                                   indent=2) + "\n")
    print(f"\n{header}\n\n{table}\n\nwrote {study / 'table.md'} and summary.json; runs in MLflow experiment "
          f"'quality' at {uri}")


if __name__ == "__main__":
    main()

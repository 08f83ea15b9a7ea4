"""Does the learned masking help? Arms of pretraining (a file: name -> pretrain flags) with the same preset,
iterations, data and paired seeds on one prepared data set, beside references without pretraining.

    python benchmarks/quality.py --name fmnist --dataset ~/data/fmnist-pq      # the arms file's settings
    python benchmarks/quality.py --name fmnist                                 # after a stop: resumes
    python benchmarks/quality.py --name quick --arms-file my-arms.yaml --seeds 0 1 -- -o run.eval_every=50

The arms file (``benchmarks/arms/fmnist.yaml`` is the study of the README) names the preset, the length,
the seeds, the fine-tune (0 epochs: none) and the arms; ``mae`` must be one of them, since every arm is
compared with it seed by seed. Each run is a real ``mlo-mae pretrain`` (Ray Train, MLflow experiment
``quality``, the linear probe at the end), optionally followed by ``mlo-mae finetune``. Every finished
run is saved at once in ``benchmarks/results/quality-NAME/runs/`` (a half-done pretrain continues from its
checkpoint), so a study resumes across sessions. Reference rows, computed in this process: the linear
probe on raw pixels, the probe of a randomly initialised encoder (per seed), and where fine-tunes are
reported the same fine-tune of a randomly initialised encoder (from scratch).

The end prints the table (mean ± sd over seeds; each arm's paired difference against MAE with a 95%
t-interval; the mask metrics at step 0 and at the end) and writes ``table.md``, ``summary.json`` and
``differences.png`` (each arm's paired difference with its interval). Arguments after ``--`` go to every
pretrain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARMS = ROOT / "benchmarks" / "arms"
RUN_ID = re.compile(r"^MLflow run ([0-9a-f]{32}) ", re.M)
SETTINGS = ("dataset", "preset", "max_steps", "seeds", "arms", "finetune", "extra")
# What each run records (MLflow metric -> field): the last value, and the first (step 0) where named here.
METRICS = {"probe/test_top1": "probe_test", "probe/val_top1": "probe_val", "probe/mean/test_top1": "probe_mean_test",
           "probe/cls/test_top1": "probe_cls_test", "finetune/test_top1": "finetune_test",
           "finetune/val_top1": "finetune_val", "eval/val_top1": "head_val", "mask/jaccard": "jaccard",
           "mask/jaccard_random": "jaccard_random", "mask/saturated_eval": "saturated",
           "mask/mean_prob_masked_eval": "mean_prob_masked", "mask/object_masked": "object_masked",
           "mask/object_masked_random": "object_masked_random", "mask/recon_vs_random": "recon_vs_random",
           "train/loss_mae": "loss_mae", "train_seconds": "train_seconds"}
FIRST = {"mask/object_masked": "object_masked_start", "mask/recon_vs_random": "recon_vs_random_start"}


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
    """The run's numbers from MLflow under the benchmark's names: last values, and the first of ``FIRST``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    metrics = client.get_run(run_id).data.metrics
    out = {field: metrics.get(key) for key, field in METRICS.items()}
    for key, field in FIRST.items():
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        out[field] = history[0].value if history else None
    return out


def pretrain(study: Path, settings: dict, arm: str, seed: int, uri: str) -> dict:
    """Pretrain one arm at one seed (or continue it from its checkpoint); the record of its MLflow run."""
    name = f"{study.name}-{arm}-s{seed}"
    log = study / "runs" / f"{arm}-s{seed}.log"
    storage = RESULTS / "ray_results"
    if (storage / name).exists():  # stopped half-way: continue from its checkpoint, into the same MLflow run
        out = cli(["pretrain", "--resume", name, "--storage-path", str(storage)], log)
    else:
        out = cli(["pretrain", "--dataset", settings["dataset"], "--preset", settings["preset"],
                   *(["--max-steps", str(settings["max_steps"])] if settings["max_steps"] else []),
                   "--seed", str(seed), *settings["arms"][arm]["flags"], "--name", name,
                   "--storage-path", str(storage), "--tracking-uri", uri, "--experiment", "quality",
                   *settings["extra"]], log)
    run_id = RUN_ID.search(out).group(1)
    return {"arm": arm, "seed": seed, "name": name, "run_id": run_id, **recorded(uri, run_id)}


def finetune(study: Path, settings: dict, record: dict, uri: str) -> dict:
    """The fine-tune of a pretrained run (a child run in MLflow); the record with its numbers."""
    ft = settings["finetune"]
    cli(["finetune", record["run_id"], "--epochs", str(ft["epochs"]), "--lr", str(ft["lr"]),
         "--warmup-epochs", str(ft["warmup_epochs"]), "--layer-decay", str(ft["layer_decay"]),
         "--batch-size", str(ft["batch_size"]), "--seed", str(record["seed"]), "--tracking-uri", uri,
         "--experiment", "quality"], study / "runs" / f"{record['arm']}-s{record['seed']}.log")
    return {**record, **recorded(uri, record["run_id"]), "finetune_settings": ft}


# ----- references without pretraining -----

def study_config(settings: dict, seed: int = 0):
    """The config the study's runs share (the preset and the ``-o`` given to every pretrain) at ``seed``."""
    sys.path.insert(0, str(ROOT))
    from mlo_mae.config import parse_override, resolve

    extra = settings["extra"]
    overrides = dict(parse_override(v) for flag, v in zip(extra, extra[1:]) if flag in ("-o", "--set"))
    return resolve(preset=settings["preset"], overrides={**overrides, "run.seed": seed})


def reference(study: Path, settings: dict, kind: str, seed: int | None) -> dict:
    """A reference row's numbers (saved like a run): the raw-pixel probe, a random encoder's probe or its
    fine-tune from scratch, with the study's config (preset, seed, probe features)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from mlo_mae.factory import create_models
    from mlo_mae.finetune import FinetuneConfig
    from pipelines.catalog import open_dataset
    from training.downstream import finetune_encoder, probe_encoder, probe_pixels

    cfg = study_config(settings, seed or 0)
    data = open_dataset(settings["dataset"], lambda _line: None)
    torch.manual_seed(cfg.run.seed)  # the encoder a run of this seed starts from (as MLOEngine builds it)
    mae = create_models(cfg.model, data.num_classes).mae
    started = time.perf_counter()
    if kind == "pixels":
        result = probe_pixels(data, cfg)
        row = {"probe_test": result.test_top1, "probe_val": result.val_top1}
    elif kind == "random":
        result = probe_encoder(mae, data, cfg)
        row = {"probe_test": result.test_top1, "probe_val": result.val_top1,
               **{f"probe_{name}_test": other.test_top1 for name, other in result.others.items()}}
    else:  # scratch: the study's fine-tune of the random encoder
        ft = settings["finetune"]
        result = finetune_encoder(mae, data, cfg, FinetuneConfig(
            epochs=ft["epochs"], lr=ft["lr"], warmup_epochs=ft["warmup_epochs"], layer_decay=ft["layer_decay"],
            seed=seed or 0), ft["batch_size"], "cpu")
        row = {"finetune_test": result.test_top1, "finetune_val": result.val_top1}
    return {"arm": kind, "seed": seed, **row, "seconds": time.perf_counter() - started}


# ----- the table -----

def t_interval(values: list[float]) -> tuple[float, float, float] | None:
    """Mean and 95% two-sided t-interval of paired differences (None for fewer than 2)."""
    if len(values) < 2:
        return None
    from scipy import stats

    mean, sd = statistics.mean(values), statistics.stdev(values)
    half = stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
    return mean, mean - half, mean + half


def fmt(values: list[float | None], scale: float = 100.0, digits: int = 2) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:  # one seed has no spread to show
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def fmt_delta(deltas: list[float]) -> str:
    ci = t_interval(deltas)
    per_seed = ", ".join(f"{100 * d:+.1f}" for d in deltas)
    if ci is None:
        return f"{100 * deltas[0]:+.2f} ({per_seed})" if deltas else "-"
    return f"{100 * ci[0]:+.2f} [{100 * ci[1]:+.2f}, {100 * ci[2]:+.2f}] ({per_seed})"


def paired(by: dict, arm: str, other: str, field: str, seeds: list[int]) -> list[float]:
    """``arm`` minus ``other`` on ``field``, seed by seed where both have it (a per-study reference: seed None)."""
    out = []
    for s in seeds:
        a = by.get((arm, s)) or by.get((arm, None))
        b = by.get((other, s)) or by.get((other, None))
        if a and b and a.get(field) is not None and b.get(field) is not None:
            out.append(a[field] - b[field])
    return out


def summarise(rows: list[dict], settings: dict) -> tuple[str, dict]:
    """The markdown table and its numbers."""
    seeds, arms = settings["seeds"], settings["arms"]
    by = {(r["arm"], r["seed"]): r for r in rows}
    finetuned = bool(settings["finetune"]["epochs"])
    refs = [("pixels", "raw pixels, linear probe (no encoder)"), ("random", "random-init encoder, linear probe")]
    if finetuned:
        refs.append(("scratch", "random-init encoder, fine-tuned (from scratch)"))
    probes = [("probe_test", f"probe ({settings.get('probe_features', 'headline')})")] + [
        (f, f"probe ({f.split('_')[1]})") for f in ("probe_mean_test", "probe_cls_test")
        if any(r.get(f) is not None for r in rows)]
    if finetuned:
        probes.append(("finetune_test", "fine-tune"))
    head = ["arm", "seeds"]
    for _, name in probes:
        head += [f"{name} test top-1", f"Δ {name} vs MAE [95% CI] (per seed)"]
    head += ["object masked: step 0 → end (random)", "error vs random masks: step 0 → end", "Jaccard (random)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary: dict = {}
    for arm, label in [(a, arms[a]["label"]) for a in arms] + refs:
        mine = [r for (a, s), r in sorted(by.items(), key=lambda kv: str(kv[0][1])) if a == arm]
        if not mine:
            continue
        entry: dict = {"label": label, "seeds": [r["seed"] for r in mine]}
        for field in ("probe_test", "probe_val", "probe_mean_test", "probe_cls_test", "finetune_test", "object_masked",
                      "object_masked_start",
                      "object_masked_random", "recon_vs_random", "recon_vs_random_start", "jaccard",
                      "jaccard_random"):
            entry[field] = [r.get(field) for r in mine]
        deltas = {f: paired(by, "mae", arm, f, seeds) if arm in dict(refs) else paired(by, arm, "mae", f, seeds)
                  for f, _ in probes}
        entry["delta_vs_mae"] = deltas  # for a reference row: MAE minus the reference (MAE's margin)
        entry["delta_ci"] = {f: t_interval(d) for f, d in deltas.items()}
        summary[arm] = entry
        is_mae = arm == "mae"
        cells = [label, str(len([r for r in mine if r["seed"] is not None]) or "-")]
        for f, _ in probes:
            cells += [fmt(entry.get(f, [])), "-" if is_mae or not deltas[f] else
                      ("MAE − this: " if arm in dict(refs) else "") + fmt_delta(deltas[f])]
        if arm in dict(refs):
            cells += ["-", "-", "-"]
        else:
            rand = next((v for v in entry["object_masked_random"] if v is not None), None)
            rj = next((v for v in entry["jaccard_random"] if v is not None), None)
            cells += [f"{fmt(entry['object_masked_start'], 1, 3)} → {fmt(entry['object_masked'], 1, 3)}"
                      + (f" ({rand:.3f})" if rand is not None else ""),
                      f"{fmt(entry['recon_vs_random_start'], 1, 2)} → {fmt(entry['recon_vs_random'], 1, 2)}",
                      fmt(entry["jaccard"], 1, 3) + (f" ({rj:.3f})" if rj is not None else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def contrasts(rows: list[dict], settings: dict) -> tuple[str, dict]:
    """The arms file's ``contrasts`` (pairs [A, B]): A minus B seed by seed on each probe, with 95% t-intervals,
    e.g. learned T against T frozen at its initialisation."""
    pairs = [(a, b) for a, b in settings.get("contrasts", []) if a in settings["arms"] and b in settings["arms"]]
    by = {(r["arm"], r["seed"]): r for r in rows}
    fields = [f for f in ("probe_test", "probe_mean_test", "probe_cls_test", "finetune_test")
              if any(r.get(f) is not None for r in rows)]
    lines = ["| contrast | " + " | ".join(f"Δ {f.removesuffix('_test').replace('_', ' ')} [95% CI] (per seed)"
                                         for f in fields) + " |", "|---|" + "---|" * len(fields)]
    out = {}
    for a, b in pairs:
        deltas = {f: paired(by, a, b, f, settings["seeds"]) for f in fields}
        out[f"{a} - {b}"] = {f: {"values": d, "ci": t_interval(d)} for f, d in deltas.items()}
        lines.append(f"| {settings['arms'][a]['label']} − {settings['arms'][b]['label']} | "
                     + " | ".join(fmt_delta(deltas[f]) if deltas[f] else "-" for f in fields) + " |")
    return ("\n".join(lines) if pairs else ""), out


def plot(summary: dict, path: Path, title: str) -> None:
    """Each arm's paired difference against MAE (probe test top-1) with its 95% interval, and the references."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [a for a in summary if a not in ("mae", "contrasts")]
    fig = Figure(figsize=(8, 0.5 * len(names) + 1.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for y, arm in enumerate(names):
        entry = summary[arm]
        deltas = [100 * d for d in entry["delta_vs_mae"]["probe_test"]]
        ci = entry["delta_ci"]["probe_test"]
        reference = arm in ("pixels", "random", "scratch")
        sign = -1 if reference else 1  # references as this minus MAE, like the arms
        ax.scatter([sign * d for d in deltas], [y] * len(deltas), s=14, color="0.6", zorder=2)
        if ci is not None:
            lo, hi = sorted((sign * 100 * ci[1], sign * 100 * ci[2]))
            ax.errorbar(sign * 100 * ci[0], y, xerr=[[sign * 100 * ci[0] - lo], [hi - sign * 100 * ci[0]]],
                        fmt="o", color="tab:gray" if reference else "tab:blue", capsize=4, zorder=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(names)), [summary[a]["label"] for a in names])
    ax.invert_yaxis()
    ax.set_xlabel("probe test top-1 minus MAE's, same seed (points)\ndots: seeds; bars: mean and 95% t-interval")
    ax.set_title(title, fontsize=9)
    fig.savefig(path)


def load_arms(path: Path) -> dict:
    """The arms file: settings and ``arms: {name: {flags: [...], label: ...}}``; one-line errors."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        sys.exit(f"quality: cannot read the arms file {path}: {' '.join(str(err).split())}")
    arms = data.get("arms") if isinstance(data, dict) else None
    if not isinstance(arms, dict) or "mae" not in arms:
        sys.exit(f"quality: {path} must map 'arms' to named arms, one of them 'mae' (the paired reference)")
    for name, arm in arms.items():
        if not isinstance(arm, dict) or not isinstance(arm.get("flags", []), list):
            sys.exit(f"quality: {path}: arm '{name}' needs 'flags' (a list of pretrain flags) and a 'label'")
        arm.setdefault("flags", [])
        arm.setdefault("label", name)
        arm["flags"] = [str(f) for f in arm["flags"]]
    return data


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help="study name; an existing one resumes with its own settings "
                                       "[default: quality-DATE-TIME]")
    parser.add_argument("--arms-file", type=Path, default=ARMS / "fmnist.yaml")
    parser.add_argument("--dataset", help="a folder written by mlo-mae prepare [default: the arms file's]")
    parser.add_argument("--seeds", type=int, nargs="+", help="[default: the arms file's]")
    parser.add_argument("--only", nargs="+", help="run these arms only (the table shows what exists)")
    parser.add_argument("--tracking-uri", default=None, help="[default: sqlite in the study folder]")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    study = RESULTS / f"quality-{args.name or time.strftime('%Y%m%d-%H%M%S')}"
    settings_file = study / "settings.json"
    if settings_file.is_file():
        settings = json.loads(settings_file.read_text())
        if args.seeds:  # more seeds may be added to a study; the rest is fixed
            settings["seeds"] = sorted(set(settings["seeds"]) | set(args.seeds))
        spec = load_arms(args.arms_file)
        new_arms = spec["arms"]
        settings["contrasts"] = spec.get("contrasts", settings.get("contrasts", []))
        for name, arm in new_arms.items():  # arms may be added, not changed
            if name in settings["arms"] and settings["arms"][name]["flags"] != arm["flags"]:
                sys.exit(f"quality: arm '{name}' of study '{study.name}' ran with flags "
                         f"{settings['arms'][name]['flags']}; give the changed arm another name")
            settings["arms"].setdefault(name, arm)
        print(f"resuming {study.name}", flush=True)
    else:
        spec = load_arms(args.arms_file)
        dataset = args.dataset or spec.get("dataset")
        if not dataset:
            sys.exit("quality: give --dataset (a folder written by mlo-mae prepare)")
        settings = {"dataset": dataset if dataset == "digits" else str(Path(dataset).expanduser().resolve()),
                    "preset": spec.get("preset", "tiny"), "max_steps": spec.get("max_steps"),
                    "seeds": args.seeds or spec.get("seeds", [0, 1, 2, 3, 4]), "arms": spec["arms"],
                    "finetune": {"epochs": 0, "lr": 5e-4, "warmup_epochs": 0.1, "layer_decay": 0.75,
                                 "batch_size": 128, **spec.get("finetune", {})},
                    "extra": [str(a) for a in spec.get("extra", [])] + extra,
                    "contrasts": spec.get("contrasts", [])}
        settings["probe_features"] = study_config(settings).run.probe_features.split("+")[0]
        (study / "runs").mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    uri = args.tracking_uri or f"sqlite:///{study / 'mlflow.db'}"
    arms = [a for a in settings["arms"] if not args.only or a in args.only]
    plan = [(arm, seed) for seed in settings["seeds"] for arm in arms]
    references = [("pixels", None)] + [("random", s) for s in settings["seeds"]]
    if settings["finetune"]["epochs"]:
        references += [("scratch", s) for s in settings["seeds"]]

    rows = []
    for kind, seed in references:
        path = study / "runs" / f"ref-{kind}{'' if seed is None else f'-s{seed}'}.json"
        if not path.is_file():
            print(f"reference {kind}{'' if seed is None else f' seed {seed}'} ...", flush=True)
            path.write_text(json.dumps(reference(study, settings, kind, seed), indent=2) + "\n")
        rows.append(json.loads(path.read_text()))
    for k, (arm, seed) in enumerate(plan, 1):
        path = study / "runs" / f"{arm}-s{seed}.json"
        row = json.loads(path.read_text()) if path.is_file() else None
        if row is None:
            print(f"[{k}/{len(plan)}] {arm} seed {seed}: pretraining ({path.with_suffix('.log')})", flush=True)
            started = time.perf_counter()
            row = {**pretrain(study, settings, arm, seed, uri), "pretrain_seconds": time.perf_counter() - started}
            path.write_text(json.dumps(row, indent=2) + "\n")
            print(f"[{k}/{len(plan)}] {arm} seed {seed}: probe test {100 * row['probe_test']:.2f}%, object masked "
                  f"{row['object_masked']:.3f} | {row['pretrain_seconds'] / 60:.1f} min", flush=True)
        if settings["finetune"]["epochs"] and row.get("finetune_settings") != settings["finetune"]:
            print(f"[{k}/{len(plan)}] {arm} seed {seed}: fine-tuning", flush=True)
            started = time.perf_counter()
            row = {**finetune(study, settings, row, uri), "finetune_seconds": time.perf_counter() - started}
            path.write_text(json.dumps(row, indent=2) + "\n")
        rows.append(row)
    rows += [json.loads(p.read_text()) for p in sorted((study / "runs").glob("*.json"))
             if not any(p.name == f"{a}-s{s}.json" for a, s in plan) and not p.name.startswith("ref-")
             and json.loads(p.read_text())["arm"] in settings["arms"]]  # arms run before, left out with --only
    table, summary = summarise(rows, settings)
    contrast_table, summary["contrasts"] = contrasts(rows, settings)
    if contrast_table:
        table += "\n\n" + contrast_table
    ft = settings["finetune"]
    length = f" | {settings['max_steps']} iterations" if settings["max_steps"] else ""
    header = (f"{settings['dataset']} | preset {settings['preset']}{length} | "
              f"seeds {' '.join(map(str, settings['seeds']))}"
              + (f" | fine-tune {ft['epochs']} epoch(s) at lr {ft['lr']:g}" if ft["epochs"] else "")
              + (f" | {' '.join(settings['extra'])}" if settings["extra"] else ""))
    (study / "table.md").write_text(f"{header}\n\n{table}\n")
    (study / "summary.json").write_text(json.dumps({"settings": settings, "arms": summary, "runs": rows},
                                                   indent=2) + "\n")
    plot(summary, study / "differences.png", header)
    print(f"\n{header}\n\n{table}\n\nwrote {study / 'table.md'}, summary.json and differences.png; runs in MLflow "
          f"experiment 'quality' at {uri}")


if __name__ == "__main__":
    main()

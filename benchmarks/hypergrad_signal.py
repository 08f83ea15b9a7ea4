"""Is T's hypergradient a signal, and does it point the right way over a horizon?

    python benchmarks/hypergrad_signal.py --dataset ~/data/fmnist-pq            # the study's recipe
    python benchmarks/hypergrad_signal.py --dataset DIR --preset tiny-28 --max-steps 500 -o mlo.selection=mixed

One process, the core engine (no Ray, no MLflow), the prepared data set read by the PyTorch reader:

1. A mid-run state: the MLO recipe (``--preset``, ``--max-steps``, ``-o``) trained for half of its
   iterations, with the schedule of the whole run (saved under benchmarks/results/, reused).
2. Signal: g_T at that state from R independent D_val batches of B images (B = 32 ... 2048), the
   Stage-I and Stage-II batches fixed (one row per B), and with all three levels' batches drawn anew
   (the noise T's optimiser sees at the run's own batch): the mean pairwise cosine.
3. Response: T moved by a step of norm s along -g, +g (g from the largest D_val batch) and along a
   random direction of the same norm; from each, E/D and C train ``--response-iterations`` iterations
   (T frozen, the same data and seeds for the three), then C's D_val loss (precise BN) on a fixed
   D_val sample. Repeated for several data orders; each difference against the random direction with
   its mean and standard deviation. Descending g should lower the loss, ascending it raise it, if the
   one-step (or K-step, ``--horizons``) hypergradient predicts what training does with T's masks.

Prints a table and writes benchmarks/results/hypergrad_signal.json.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlo_mae.config import parse_override, resolve, total_iterations  # noqa: E402
from mlo_mae.engine import MLOEngine  # noqa: E402
from mlo_mae.evaluation import precise_head  # noqa: E402
from mlo_mae.mask_metrics import mean_pairwise_jaccard, object_masked_share, object_patches  # noqa: E402
from mlo_mae.masking import patch_statistic  # noqa: E402
from pipelines.catalog import open_dataset  # noqa: E402
from pipelines.streams import Normalizer, level_specs  # noqa: E402
from pipelines.torch_data import loader  # noqa: E402
from training.downstream import read_images  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def endless(data, spec, batch: int, norm: Normalizer):
    """Normalised batches of one level's split forever, epoch after epoch (the reader's own shuffle)."""
    stream = loader(data, spec, batch, shuffle=True, drop_last=True)
    for epoch in itertools.count():
        stream.dataset.set_epoch(epoch)
        for x, y in stream:
            yield norm(x, y)


def streams(data, cfg, norm: Normalizer, seed: int) -> dict:
    specs = level_specs(data, cfg.model.img_size, cfg.data.augment, seed, cfg.data.augment_head)
    return {level: endless(data, spec, getattr(cfg.data, f"batch_{level}"), norm) for level, spec in specs.items()}


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def mean_pairwise_cosine(vectors: list[torch.Tensor]) -> float:
    pairs = [float(F.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(vectors, 2)]
    return statistics.mean(pairs)


def mid_state(cfg, data, norm, path: Path, log) -> dict:
    """The engine's state after half of the run (trained once, then read from ``path``)."""
    if path.is_file():
        log(f"mid-run state: {path}")
        return torch.load(path, weights_only=True)
    total = cfg.run.max_steps
    engine = MLOEngine(cfg, data.num_classes, total)
    batches = streams(data, cfg, norm, cfg.run.seed)
    start = time.perf_counter()
    while engine.iteration < total // 2:
        engine.step(batches)
        if engine.iteration % 25 == 0:
            log(f"  training to the mid-run state: iteration {engine.iteration}/{total // 2} "
                f"({time.perf_counter() - start:.0f} s)")
    state = engine.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def hypergradient(engine: MLOEngine, stage1, stage2, stage3, horizon: int) -> torch.Tensor:
    engine.cfg.mlo.horizon = horizon
    return flat(engine.hypergradient(stage1, stage2, stage3)[0]).double()


def concat(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def signal(engine: MLOEngine, data, cfg, norm, sizes: list[int], repeats: int, horizon: int, log) -> dict:
    """Mean pairwise cosine of g_T over independent D_val batches of each size."""
    batches = streams(data, cfg, norm, seed=cfg.run.seed + 101)
    stage1, stage2 = next(batches["mae"])[0], next(batches["head"])
    val = endless(data, level_specs(data, cfg.model.img_size, cfg.data.augment, 7)["mask"], 32, norm)
    out = {}
    for size in sizes:
        grads = [hypergradient(engine, stage1, stage2, concat([next(val) for _ in range(size // 32)]), horizon)
                 for _ in range(repeats)]
        out[size] = mean_pairwise_cosine(grads)
        log(f"  K={horizon} D_val batch {size}: cosine {out[size]:.3f}")
    own = [hypergradient(engine, next(batches["mae"])[0], next(batches["head"]), next(batches["mask"]), horizon)
           for _ in range(repeats)]
    out["all levels"] = mean_pairwise_cosine(own)
    log(f"  K={horizon} all three batches drawn anew: cosine {out['all levels']:.3f}")
    return out


def moved(state: dict, direction: torch.Tensor) -> MLOEngine:
    """A copy of the engine at ``state`` with T's parameters moved by ``direction``, T frozen after."""
    engine = MLOEngine.from_state_dict(copy.deepcopy(state))
    engine.cfg.optim.lr_mask = 0.0  # no Stage III: T stays where it was put
    with torch.no_grad():
        offset = 0
        for p in engine.masknet.parameters():
            p.add_(direction[offset: offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
    return engine


def val_loss(engine: MLOEngine, images, labels, train_images, norm) -> float:
    head = precise_head(engine, train_images, norm)
    with torch.no_grad():
        engine.mae.eval()
        logits = torch.cat([head(engine.mae.forward_features(norm(images[i:i + 256], labels[i:i + 256])[0]))
                            for i in range(0, len(images), 256)])
        engine.mae.train()
    return float(F.cross_entropy(logits.float(), labels))


def masks_of(engine: MLOEngine, images, labels, norm):
    x = norm(images, labels)[0]
    with torch.no_grad():
        _, mask = engine.choose_mask(x, torch.Generator().manual_seed(0))
        objects = object_patches(patch_statistic(engine.mae.patchify(x)), torch.Generator().manual_seed(1))
    return mask.mask, objects


def response(state: dict, g: torch.Tensor, step: float, data, cfg, norm, iterations: int, orders: list[int],
             sample, log) -> dict:
    """C's D_val loss after training from T moved along -g, +g and a random direction of the same norm."""
    images, labels, train_images = sample
    gen = torch.Generator().manual_seed(12345)
    random = torch.randn(g.shape, generator=gen, dtype=g.dtype)
    directions = {"-g": -g / g.norm() * step, "+g": g / g.norm() * step, "random": random / random.norm() * step}
    base = MLOEngine.from_state_dict(copy.deepcopy(state))
    base_masks, objects = masks_of(base, images[:512], labels[:512], norm)
    out: dict = {"masks": {}, "loss": {name: [] for name in directions}}
    for name, direction in directions.items():
        engine = moved(state, direction)
        masks, _ = masks_of(engine, images[:512], labels[:512], norm)
        overlap = ((masks * base_masks).sum(1) / ((masks + base_masks) > 0).float().sum(1)).mean()
        out["masks"][name] = {"jaccard_to_start": float(overlap),
                              "object_masked": object_masked_share(objects, masks),
                              "object_masked_start": object_masked_share(objects, base_masks),
                              "jaccard_across_images": mean_pairwise_jaccard(masks)}
    for order in orders:
        for name, direction in directions.items():
            engine = moved(state, direction)
            batches = streams(data, cfg, norm, seed=1000 + order)
            torch.manual_seed(order)
            for _ in range(iterations):
                engine.step(batches)
            out["loss"][name].append(val_loss(engine, images, labels, train_images, norm))
        log(f"  data order {order}: " + ", ".join(f"{n} {out['loss'][n][-1]:.4f}" for n in directions))
    for name in ("-g", "+g"):
        diffs = [a - b for a, b in zip(out["loss"][name], out["loss"]["random"])]
        out[f"{name} minus random"] = {"mean": statistics.mean(diffs),
                                      "sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0, "values": diffs}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a folder written by mlo-mae prepare")
    parser.add_argument("--preset", default="tiny-28")
    parser.add_argument("--max-steps", type=int, default=None, help="the run's length [default: the preset's]")
    parser.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sizes", default="32,128,512,2048", help="D_val batch sizes of the signal test")
    parser.add_argument("--repeats", type=int, default=4, help="independent batches per size")
    parser.add_argument("--horizons", default="1,2,4")
    parser.add_argument("--step", type=float, default=None,
                        help="norm of T's move in the response test [default: 20 lr_mask-sized Adam steps]")
    parser.add_argument("--response-iterations", type=int, default=25)
    parser.add_argument("--orders", type=int, default=3, help="data orders of the response test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "hypergrad_signal.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    overrides = dict(parse_override(o) for o in args.overrides)
    if args.max_steps:
        overrides["run.max_steps"] = args.max_steps
    data = open_dataset(str(args.dataset), log)
    cfg = resolve(preset=args.preset, overrides={**overrides, "data.dataset": str(args.dataset)})
    cfg.run.max_steps = total_iterations(cfg, data.count("train"))  # the run's length, epochs or iterations
    norm = Normalizer(data.mean, data.std, "cpu")
    key = "-".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    state = mid_state(cfg, data, norm, RESULTS / "hypergrad-signal" / f"{args.preset}-{key or 'default'}.pt", log)
    images, labels = read_images(data, cfg, "val", 2048)
    train_images = read_images(data, cfg, "train", 2048)[0]
    sizes = [int(s) for s in args.sizes.split(",")]
    horizons = [int(k) for k in args.horizons.split(",")]
    n_params = sum(p.numel() for p in MLOEngine.from_state_dict(copy.deepcopy(state)).masknet.parameters())
    step = args.step or 20 * cfg.optim.lr_mask * n_params ** 0.5
    report: dict = {"settings": {**vars(args), "dataset": str(args.dataset), "out": str(args.out),
                                 "state_iteration": state["iteration"], "total_iterations": cfg.run.max_steps,
                                 "step_norm": step, "t_parameters": n_params}, "horizons": {}}
    for horizon in horizons:
        log(f"horizon K={horizon}: signal")
        engine = MLOEngine.from_state_dict(copy.deepcopy(state))
        sig = signal(engine, data, cfg, norm, sizes, args.repeats, horizon, log)
        log(f"horizon K={horizon}: response (step norm {step:.3g})")
        val = endless(data, level_specs(data, cfg.model.img_size, cfg.data.augment, 7)["mask"], 32, norm)
        batches = streams(data, cfg, norm, seed=cfg.run.seed + 101)
        g = hypergradient(engine, next(batches["mae"])[0], next(batches["head"]),
                          concat([next(val) for _ in range(max(sizes) // 32)]), horizon)
        resp = response(state, g, step, data, cfg, norm, args.response_iterations, list(range(args.orders)),
                        (images, labels, train_images), log)
        report["horizons"][horizon] = {"signal": {str(k): v for k, v in sig.items()}, "response": resp}

    rows = []
    print(f"{'K':>2} | " + " | ".join(f"cos B={s}" for s in sizes) + " | cos (all new) | "
          "L_val(-g) - L_val(random) | L_val(+g) - L_val(random) | Jaccard to start (-g / +g) | object masked "
          "(start -> -g / +g)")
    for horizon, entry in report["horizons"].items():
        sig, resp = entry["signal"], entry["response"]
        minus, plus = resp["-g minus random"], resp["+g minus random"]
        m = resp["masks"]
        row = (f"{horizon:>2} | " + " | ".join(f"{sig[str(s)]:>8.3f}" for s in sizes) +
               f" | {sig['all levels']:>13.3f} | {minus['mean']:+.4f} ± {minus['sd']:.4f} | "
               f"{plus['mean']:+.4f} ± {plus['sd']:.4f} | {m['-g']['jaccard_to_start']:.2f} / "
               f"{m['+g']['jaccard_to_start']:.2f} | {m['-g']['object_masked_start']:.3f} -> "
               f"{m['-g']['object_masked']:.3f} / {m['+g']['object_masked']:.3f}")
        rows.append(row)
        print(row)
    print(f"state: iteration {state['iteration']} of {cfg.run.max_steps}; step norm {step:.3g} "
          f"({n_params} weights in T); {args.orders} data orders x {args.response_iterations} iterations")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

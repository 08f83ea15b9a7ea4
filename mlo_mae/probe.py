"""Linear probe: a frozen encoder (eval mode), its CLS (or mean patch) features, one linear layer.

Model selection (the L2 strength) uses D_val only; the test split is scored once,
with the selected probe, at the very end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .mae import MaskedAutoencoderViT
from .modes import eval_mode

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class ProbeResult:
    val_top1: float
    test_top1: float | None
    weight_decay: float
    features: str = "cls"  # what the probe read (run.probe_features)
    others: dict[str, ProbeResult] = field(default_factory=dict)  # probes of further features, by name


POOLS = ("cls", "mean", "tokens")  # run.probe_features, one or several joined by '+'


def pool_features(tokens: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """(B, 1 + N, d) encoder output -> (B, features): the CLS token (d), the mean of the N patch tokens
    (d; timm's ``global_pool='avg'``), or the whole map of patch tokens flattened (N * d: what the
    raw-pixel probe reads too, a spatial map, measured in the README)."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(1)
    if pool == "tokens":
        return tokens[:, 1:].flatten(1)
    raise ValueError(f"unknown probe features {pool!r} (choose from {', '.join(POOLS)})")


@torch.no_grad()
def extract_features(mae: MaskedAutoencoderViT, images: torch.Tensor, batch_size: int = 256,
                     pool: str = "cls") -> torch.Tensor:
    """Features of whole images (after the encoder's final norm, ``pool_features``), in eval mode, on the
    model's device."""
    return extract_pools(mae, images, (pool,), batch_size)[pool]


@torch.no_grad()
def extract_pools(mae: MaskedAutoencoderViT, images: torch.Tensor, pools: tuple[str, ...],
                  batch_size: int = 256) -> dict[str, torch.Tensor]:
    """``extract_features`` for several poolings from one encoder pass."""
    device = next(mae.parameters()).device
    out: dict[str, list[torch.Tensor]] = {pool: [] for pool in pools}
    with eval_mode(mae):
        for i in range(0, len(images), batch_size):
            tokens = mae.forward_features(images[i: i + batch_size].to(device))
            for pool in pools:
                out[pool].append(pool_features(tokens, pool).float().cpu())
    return {pool: torch.cat(parts) for pool, parts in out.items()}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The solve is ~500 small products in sequence (N x d by d x K, a few MFLOP each): threads cannot
    speed them up, and on a busy shared CPU every parallel region waits for a descheduled thread.
    Measured on the digits features, two threads against one with other jobs running: 23 ms instead of
    0.9 ms per product, 32-42 s instead of 1.7 s for the whole L2 sweep."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, steps: int) -> torch.nn.Linear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + 0.5 * weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return layer


def _top1(layer: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer(x).argmax(-1) == y).float().mean())


Features = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ChosenProbe:
    """The probe selected on D_val: its layer, the train statistics it standardises by, its numbers."""

    layer: torch.nn.Linear
    mean: torch.Tensor
    std: torch.Tensor
    val_top1: float
    weight_decay: float

    def top1(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return _top1(self.layer, (x - self.mean) / self.std, y)


def choose_probe(train: Features, val: Features, num_classes: int, steps: int = 200) -> ChosenProbe:
    """Multinomial logistic regression on standardised features (train statistics), its L2 strength
    chosen on D_val (ties go to the stronger regulariser)."""
    mean, std = train[0].mean(0), train[0].std(0) + 1e-6

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    candidates = []
    with _one_thread():  # features live on the CPU whatever the encoder's device
        for wd in WEIGHT_DECAYS:
            layer = _fit(norm(train[0]), train[1], num_classes, wd, steps)
            candidates.append((_top1(layer, norm(val[0]), val[1]), wd, layer))
    val_top1, wd, best = max(candidates, key=lambda c: (c[0], c[1]))
    return ChosenProbe(best, mean, std, val_top1, wd)


def linear_probe(train: Features, val: Features, test: Callable[[], Features] | None, num_classes: int,
                 steps: int = 200) -> ProbeResult:
    """``choose_probe``, then the test split scored by the chosen probe.

    ``test`` is called once, after the probe was chosen on D_val: the test split is not
    even read before then.
    """
    chosen = choose_probe(train, val, num_classes, steps)
    test_top1 = chosen.top1(*test()) if test is not None else None
    return ProbeResult(val_top1=chosen.val_top1, test_top1=test_top1, weight_decay=chosen.weight_decay)

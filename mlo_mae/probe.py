"""Linear probe: a frozen encoder (eval mode), its CLS features, one linear layer.

Model selection (the L2 strength) uses D_val only; the test split is scored once,
with the selected probe, at the very end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


@torch.no_grad()
def extract_features(mae: MaskedAutoencoderViT, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Normalised CLS features of whole images, in eval mode, on the model's device."""
    device = next(mae.parameters()).device
    with eval_mode(mae):
        out = [mae.forward_features(images[i: i + batch_size].to(device))[:, 0].float().cpu()
               for i in range(0, len(images), batch_size)]
    return torch.cat(out)


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


def linear_probe(train: Features, val: Features, test: Callable[[], Features] | None, num_classes: int,
                 steps: int = 200) -> ProbeResult:
    """Multinomial logistic regression on standardised features (train statistics).

    ``test`` is called once, after the probe was chosen on D_val: the test split is not
    even read before then.
    """
    mean, std = train[0].mean(0), train[0].std(0) + 1e-6

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    candidates = []
    with _one_thread():  # features live on the CPU whatever the encoder's device
        for wd in WEIGHT_DECAYS:
            layer = _fit(norm(train[0]), train[1], num_classes, wd, steps)
            candidates.append((_top1(layer, norm(val[0]), val[1]), wd, layer))
    # Ties go to the stronger regulariser.
    val_top1, wd, best = max(candidates, key=lambda c: (c[0], c[1]))
    if test is None:
        return ProbeResult(val_top1=val_top1, test_top1=None, weight_decay=wd)
    x_test, y_test = test()
    test_top1 = _top1(best, norm(x_test), y_test)
    return ProbeResult(val_top1=val_top1, test_top1=test_top1, weight_decay=wd)

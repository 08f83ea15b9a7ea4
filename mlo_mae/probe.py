"""Linear probe: a frozen encoder (eval mode), its CLS features, one linear layer.

Model selection (the L2 strength) uses D_val only; the test split is scored once,
with the selected probe, at the very end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mae import MaskedAutoencoderViT

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class ProbeResult:
    val_top1: float
    test_top1: float | None
    weight_decay: float


@torch.no_grad()
def extract_features(mae: MaskedAutoencoderViT, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Normalised CLS features of whole images, in eval mode, on the model's device."""
    was_training = mae.training
    mae.eval()
    device = next(mae.parameters()).device
    out = [mae.forward_features(images[i: i + batch_size].to(device))[:, 0].float().cpu()
           for i in range(0, len(images), batch_size)]
    mae.train(was_training)
    return torch.cat(out)


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

"""Full fine-tuning of a pretrained encoder E with a fresh linear head: the paper's evaluation.

The encoder goes to timm's ``VisionTransformer`` under its own key names (``mlo_mae.export``),
gets a new head, and every weight is trained with AdamW on a warmup + cosine schedule
(CIFAR: lr 1e-4, 100 epochs; ImageNet: MAE's recipe with layer-wise lr decay 0.75, drop
path 0.1, label smoothing 0.1). Crop + flip augmentation belongs to the caller's data.

Model selection uses D_val only: the weights of the best validation epoch are kept and
restored, and the test split is scored once, with those weights, at the very end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .config import ModelConfig
from .export import timm_vit_kwargs
from .modes import eval_mode
from .optim import warmup_cosine

HEAD_KEYS = ("head.weight", "head.bias")
# Tokens and position embeddings are not weights: no decay (timm's and MAE's no_weight_decay list).
NO_WEIGHT_DECAY = frozenset({"cls_token", "reg_token", "dist_token", "pos_embed"})
# Everything applied before the first block is layer 0 of the layer-wise lr decay.
STEM_PREFIXES = ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre")

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # normalised float images on any device + int labels


@dataclass
class FinetuneConfig:
    epochs: int = 100
    lr: float = 1e-4  # for the last layer (lr_scale 1); earlier layers get layer_decay powers of it
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0  # linear warmup then cosine to 0, per optimiser step
    layer_decay: float = 1.0  # MAE/BEiT layer-wise lr decay: 1.0 = off (CIFAR protocol), 0.75 ImageNet
    drop_path: float = 0.0  # only read by the caller's build_classifier(..., drop_path=cfg.drop_path)
    label_smoothing: float = 0.0
    seed: int = 0


@dataclass
class EpochResult:
    epoch: int  # 0-based, the argument train() got
    train_loss: float  # mean over the epoch's steps
    val_top1: float
    lr: float  # the schedule's lr (lr_scale 1) at the epoch's last step
    seconds: float  # training and validation


@dataclass
class FinetuneResult:
    best_epoch: int
    val_top1: float  # of best_epoch
    test_top1: float | None  # with best_epoch's weights; None without a test split
    history: list[EpochResult]


def build_classifier(model_cfg: ModelConfig, encoder_state: dict[str, torch.Tensor], num_classes: int,
                     drop_path: float = 0.0) -> VisionTransformer:
    """timm ``VisionTransformer`` with E's weights and a fresh ``num_classes`` head.

    Every encoder key must land on a timm parameter of the same shape and every timm
    parameter but the head must come from ``encoder_state``: a silently skipped key
    would fine-tune a partly random encoder, so any mismatch is a ValueError naming
    the keys. The head is new by design (the protocol replaces C), so an
    ``encoder_state`` that carries ``head.*`` is refused too. Head init is MAE's:
    trunc_normal std 2e-5 weights (timm's absolute [-2, 2] bounds, as MAE), zero bias.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    head = sorted(k for k in encoder_state if k.startswith("head."))
    if head:
        raise ValueError(f"encoder_state carries head weights {head}; the classifier gets a fresh head: "
                         "pass the encoder alone (timm_state_dict(mae))")
    model = VisionTransformer(**timm_vit_kwargs(model_cfg, num_classes), drop_path_rate=drop_path)
    own = model.state_dict()
    shapes = [f"{k}: {tuple(v.shape)} vs timm {tuple(own[k].shape)}"
              for k, v in encoder_state.items() if k in own and v.shape != own[k].shape]
    if shapes:
        raise ValueError(f"encoder weights do not fit the timm VisionTransformer: shape mismatch {shapes}")
    loaded = model.load_state_dict(encoder_state, strict=False)
    missing = sorted(set(loaded.missing_keys) - set(HEAD_KEYS))
    unexpected = sorted(loaded.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"encoder weights do not match the timm VisionTransformer: "
                         f"missing keys {missing}, unexpected keys {unexpected}")
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


def _layer_id(name: str, depth: int) -> int:
    """MAE's get_layer_id_for_vit: stem 0, blocks.i -> i + 1, the rest (norm, fc_norm, head) depth + 1."""
    if name.startswith(STEM_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: VisionTransformer, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with MAE's layer-wise lr decay (param_groups_lrd).

    Biases, norm weights (every 1-D parameter) and the cls/pos tokens get no weight
    decay. Layer id: 0 for patch_embed/cls_token/pos_embed, i + 1 for blocks.i,
    depth + 1 for norm/fc_norm/head; ``lr_scale = layer_decay ** (depth + 1 - id)``,
    so the head trains at the full lr and the stem at the smallest, keeping the
    pretrained low layers closest to where they were. Frozen parameters are left out.
    Each group carries 'lr_scale', which ``finetune`` multiplies into the schedule.
    """
    depth = len(model.blocks)
    no_decay = NO_WEIGHT_DECAY | set(getattr(model, "no_weight_decay", set)())
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = _layer_id(name, depth)
        decay = p.ndim > 1 and name not in no_decay
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, device: torch.device | str) -> float:
    """Top-1 accuracy over all samples (not a mean of batch means), in eval mode, without grad.

    The model's previous modes (each submodule's own) are restored afterwards.
    """
    device = torch.device(device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    with eval_mode(model):
        for images, labels in batches:
            logits = model(images.to(device, non_blocking=True))
            correct += (logits.argmax(-1) == labels.to(device, non_blocking=True)).sum()
            count += labels.numel()
    if count == 0:
        raise ValueError("evaluate: the split yielded no samples")
    return correct.item() / count


def _fused_ok(device: torch.device) -> bool:
    # The fused AdamW kernel exists for CPU and CUDA; elsewhere fall back to foreach.
    return device.type in ("cpu", "cuda")


def finetune(model: nn.Module, train: Callable[[int], Batches], val: Callable[[], Batches],
             test: Callable[[], Batches] | None, cfg: FinetuneConfig, device: torch.device | str,
             steps_per_epoch: int, on_epoch: Callable[[EpochResult], None] | None = None) -> FinetuneResult:
    """Fine-tune every weight of ``model`` (from ``build_classifier``) and select the best epoch on D_val.

    ``train(epoch)`` yields that epoch's batches (the caller shuffles and augments by
    epoch) and must yield exactly ``steps_per_epoch`` of them: the warmup + cosine
    schedule runs per optimiser step over ``epochs * steps_per_epoch`` steps, known
    from the start, and reaches 0 at the last one. After each epoch D_val top-1 is
    measured in eval mode; the best epoch's weights (ties: the earlier epoch) are kept
    as a CPU copy. At the end they are restored and ``test()`` is called exactly once,
    so the test split never influences a choice. The model is left on ``device`` with
    the best weights, in eval mode.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr,
                                  betas=(0.9, 0.999), fused=_fused_ok(device))
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)

    history: list[EpochResult] = []
    best_epoch, best_top1, best_state = -1, -math.inf, None
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        model.train()
        loss_sum, n, lr = 0.0, 0, 0.0
        for images, labels in train(epoch):
            if n == steps_per_epoch:
                raise ValueError(f"train({epoch}) yielded more than steps_per_epoch={steps_per_epoch} batches")
            step = epoch * steps_per_epoch + n
            lr = warmup_cosine(step, total, warmup, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            loss = F.cross_entropy(model(images), labels, label_smoothing=cfg.label_smoothing)
            value = loss.item()
            if not math.isfinite(value):
                raise ValueError(f"non-finite training loss {value} at epoch {epoch}, step {n} (global step {step})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += value
            n += 1
        if n != steps_per_epoch:
            raise ValueError(f"train({epoch}) yielded {n} batches, steps_per_epoch is {steps_per_epoch}")
        val_top1 = evaluate(model, val(), device)
        if val_top1 > best_top1:
            best_epoch, best_top1 = epoch, val_top1
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        result = EpochResult(epoch=epoch, train_loss=loss_sum / n, val_top1=val_top1, lr=lr,
                             seconds=time.perf_counter() - start)
        history.append(result)
        if on_epoch is not None:
            on_epoch(result)

    model.load_state_dict(best_state)
    model.eval()
    test_top1 = evaluate(model, test(), device) if test is not None else None
    return FinetuneResult(best_epoch=best_epoch, val_top1=best_top1, test_top1=test_top1, history=history)

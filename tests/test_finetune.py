"""Full fine-tuning: weight transfer, layer-wise lr groups, schedule, model selection, test-once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mlo_mae.export import timm_state_dict
from mlo_mae.factory import create_mae
from mlo_mae.finetune import EpochResult, FinetuneConfig, build_classifier, evaluate, finetune, param_groups

CLASSES = 3


def trained_looking_mae(seed: int = 0):
    """A tiny MAE whose every encoder tensor (biases, norms, fixed pos_embed too) is non-trivial,
    so that a weight landing on the wrong timm key changes the output."""
    torch.manual_seed(seed)
    mae = create_mae(tiny_model())
    with torch.no_grad():
        for t in list(mae.parameters()) + list(mae.buffers()):
            t.add_(0.1 * torch.randn_like(t))
    return mae.eval()


def colour_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes of noise images; class k is brighter in colour channel k."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = 0.5 * torch.randn(n, 3, 8, 8, generator=gen)
    x[torch.arange(n), y] += 1.5
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, size: int, order: torch.Tensor | None = None):
    order = torch.arange(len(x)) if order is None else order
    return [(x[order[i: i + size]], y[order[i: i + size]]) for i in range(0, len(x), size)]


TRAIN, VAL, TEST = colour_split(96, 1), colour_split(48, 2), colour_split(48, 3)
BATCH, STEPS = 16, 6  # 96 / 16


def train_fn(epoch: int):
    """Reshuffled per epoch, as a real loader would."""
    return batches(*TRAIN, BATCH, torch.randperm(96, generator=torch.Generator().manual_seed(100 + epoch)))


def classifier(seed: int = 0):
    torch.manual_seed(seed)
    return build_classifier(tiny_model(), timm_state_dict(trained_looking_mae(seed)), CLASSES)


# ----- build_classifier -----

def test_encoder_weights_load_into_timm_and_give_the_same_features():
    mae = trained_looking_mae()
    clf = build_classifier(tiny_model(), timm_state_dict(mae), num_classes=CLASSES, drop_path=0.1).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ours, timms = mae.forward_features(x), clf.forward_features(x)
        assert timms.shape == ours.shape == (4, 1 + 16, 16)
        torch.testing.assert_close(timms, ours, atol=1e-5, rtol=0)
        # logits are the fresh head on the CLS token
        torch.testing.assert_close(clf(x), clf.head(ours[:, 0]), atol=1e-6, rtol=0)
    # drop path reaches timm's stochastic-depth rule (linear up to the rate at the last block)
    assert clf.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert clf.blocks[0].drop_path1.__class__ is nn.Identity


def test_fresh_head_follows_mae_init():
    torch.manual_seed(0)
    clf = build_classifier(tiny_model(), timm_state_dict(trained_looking_mae()), num_classes=200)
    w = clf.head.weight
    assert w.shape == (200, 16)
    assert 1.8e-5 < float(w.detach().std()) < 2.2e-5  # 3200 draws: about 1.3% standard error
    assert float(w.detach().mean().abs()) < 2e-6
    assert torch.count_nonzero(clf.head.bias) == 0


@pytest.mark.parametrize("edit,named", [
    (lambda s: s.update({"decoder_embed.weight": torch.zeros(12, 16)}), "decoder_embed.weight"),
    (lambda s: s.update({"blocks.0.attn.qkv.weigth": s.pop("blocks.0.attn.qkv.weight")}),
     "blocks.0.attn.qkv.weigth"),
    (lambda s: s.pop("norm.weight"), "norm.weight"),
    (lambda s: s.update({"pos_embed": s["pos_embed"][:, 1:]}), "pos_embed"),
    (lambda s: s.update({"head.weight": torch.zeros(CLASSES, 16)}), "head.weight"),
])
def test_mismatched_encoder_state_is_refused_naming_the_key(edit, named):
    state = timm_state_dict(trained_looking_mae())
    edit(state)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        build_classifier(tiny_model(), state, num_classes=CLASSES)


# ----- param_groups -----

def test_param_groups_match_a_hand_computed_layer_decay_table():
    clf = classifier()
    # depth 2, layer_decay 0.5: stem 0.5**3, blocks.0 0.5**2, blocks.1 0.5, norm/head 1. (scale, decayed?)
    table = {"cls_token": (0.125, False), "pos_embed": (0.125, False),
             "patch_embed.proj.weight": (0.125, True), "patch_embed.proj.bias": (0.125, False),
             "norm.weight": (1.0, False), "norm.bias": (1.0, False),
             "head.weight": (1.0, True), "head.bias": (1.0, False)}
    block = {"norm1.weight": False, "norm1.bias": False, "attn.qkv.weight": True, "attn.qkv.bias": False,
             "attn.proj.weight": True, "attn.proj.bias": False, "norm2.weight": False, "norm2.bias": False,
             "mlp.fc1.weight": True, "mlp.fc1.bias": False, "mlp.fc2.weight": True, "mlp.fc2.bias": False}
    for i, scale in ((0, 0.25), (1, 0.5)):
        table.update({f"blocks.{i}.{k}": (scale, decayed) for k, decayed in block.items()})

    name_of = {id(p): n for n, p in clf.named_parameters()}
    seen: list[str] = []
    for group in param_groups(clf, weight_decay=0.05, layer_decay=0.5):
        for p in group["params"]:
            name = name_of[id(p)]
            seen.append(name)
            scale, decayed = table[name]
            assert group["lr_scale"] == pytest.approx(scale), name
            assert group["weight_decay"] == (0.05 if decayed else 0.0), name
    assert sorted(seen) == sorted(table)  # every parameter exactly once, nothing else

    flat = param_groups(clf, weight_decay=0.05, layer_decay=1.0)
    assert {g["lr_scale"] for g in flat} == {1.0}


# ----- evaluate -----

def test_evaluate_counts_samples_in_eval_mode_without_grad():
    class Logits(nn.Module):
        def forward(self, x):
            self.seen = (self.training, torch.is_grad_enabled())
            return x

    model = Logits().train()
    split = [(torch.eye(3), torch.tensor([0, 1, 2])), (torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([2]))]
    assert evaluate(model, split, "cpu") == pytest.approx(3 / 4)  # a mean of batch means would say 1/2
    assert model.seen == (False, False)
    assert model.training  # the caller's mode comes back
    with pytest.raises(ValueError):
        evaluate(model, [], "cpu")


# ----- finetune -----

def test_learns_a_separable_problem_and_scores_test_with_the_best_weights():
    clf = classifier()
    cfg = FinetuneConfig(epochs=4, lr=2e-3, warmup_epochs=0.5, weight_decay=0.05)
    epochs: list[EpochResult] = []
    result = finetune(clf, train_fn, lambda: batches(*VAL, 32), lambda: batches(*TEST, 32), cfg, "cpu",
                      steps_per_epoch=STEPS, on_epoch=epochs.append)
    assert result.history == epochs and [e.epoch for e in epochs] == [0, 1, 2, 3]
    assert result.val_top1 > 0.8 and result.test_top1 > 0.8  # chance is 1/3
    assert epochs[-1].train_loss < epochs[0].train_loss
    vals = [e.val_top1 for e in epochs]
    assert result.best_epoch == vals.index(max(vals)) and result.val_top1 == max(vals)
    assert not clf.training
    # the model handed back holds the selected weights, and test was scored with them
    assert evaluate(clf, batches(*VAL, 32), "cpu") == result.val_top1
    assert evaluate(clf, batches(*TEST, 32), "cpu") == result.test_top1


def test_a_later_worse_epoch_does_not_replace_the_best_weights():
    """Validation is honest only at epoch 2 (later and earlier calls see wrong labels), so epoch 2
    must win; the returned model must then be epoch 2's weights, not the last epoch's."""
    clf = classifier()
    snapshots: list[dict] = []
    calls = {"val": 0}

    def val():
        honest = calls["val"] == 2
        calls["val"] += 1
        x, y = VAL
        return batches(x, y if honest else (y + 1) % CLASSES, 32)

    def on_epoch(_: EpochResult):
        snapshots.append({k: v.clone() for k, v in clf.state_dict().items()})

    cfg = FinetuneConfig(epochs=4, lr=2e-3)
    result = finetune(clf, train_fn, val, lambda: batches(*TEST, 32), cfg, "cpu", STEPS, on_epoch)
    vals = [e.val_top1 for e in result.history]
    assert vals[2] > 0.8 and max(vals[:2] + vals[3:]) < 0.5  # the premise of the test
    assert result.best_epoch == 2 and result.val_top1 == vals[2]
    state = clf.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshots[2].items())
    assert not all(torch.equal(state[k], v) for k, v in snapshots[3].items())
    # independent reference: a fresh classifier loaded with epoch 2's snapshot scores the test split the same
    ref = classifier(seed=1)
    ref.load_state_dict(snapshots[2])
    assert result.test_top1 == evaluate(ref, batches(*TEST, 32), "cpu")


def test_test_split_is_read_once_after_the_last_validation_and_modes_are_right():
    clf = classifier()
    log: list[str] = []
    forwards: list[tuple[str, bool, bool]] = []
    phase = {"now": None}

    def stream(name, items):
        for item in items:
            phase["now"] = name
            yield item

    def train(epoch):
        log.append(f"train{epoch}")
        return stream("train", train_fn(epoch))

    def val():
        log.append("val")
        return stream("val", batches(*VAL, 32))

    def test():
        log.append("test")
        return stream("test", batches(*TEST, 32))

    clf.register_forward_pre_hook(lambda m, _: forwards.append((phase["now"], m.training, torch.is_grad_enabled())))
    cfg = FinetuneConfig(epochs=3, lr=1e-3)
    clf.eval()  # handed over in eval mode: training must still run in train mode
    result = finetune(clf, train, val, test, cfg, "cpu", STEPS)
    assert log == ["train0", "val", "train1", "val", "train2", "val", "test"]
    assert result.test_top1 is not None
    assert forwards.count(("train", True, True)) == 3 * STEPS
    assert forwards.count(("val", False, False)) == 3 * 2
    assert forwards.count(("test", False, False)) == 2
    assert len(forwards) == 3 * STEPS + 3 * 2 + 2

    log.clear()
    result = finetune(classifier(), train, val, None, cfg, "cpu", STEPS)
    assert result.test_top1 is None and "test" not in log


def test_lr_schedule_is_warmup_then_cosine_to_zero_times_layer_scale():
    clf = classifier()
    seen: list[list[tuple[float, float]]] = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, *_: seen.append([(g["lr"], g["lr_scale"]) for g in opt.param_groups]))
    epochs: list[EpochResult] = []
    base, steps, warmup = 1e-3, 4, 4  # warmup_epochs=1 at 4 steps per epoch
    cfg = FinetuneConfig(epochs=3, lr=base, warmup_epochs=1.0, layer_decay=0.5)
    try:
        finetune(clf, lambda e: train_fn(e)[:steps], lambda: batches(*VAL, 48), None, cfg, "cpu", steps,
                 epochs.append)
    finally:
        hook.remove()
    total = 3 * steps
    assert len(seen) == total

    def expected(s: int) -> float:  # closed form: linear warmup, cosine landing on 0 at step total - 1
        if s < warmup:
            return base * (s + 1) / warmup
        return base * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - 1 - warmup)))

    for s, groups in enumerate(seen):
        assert {scale for _, scale in groups} == {0.125, 0.25, 0.5, 1.0}
        for lr, scale in groups:
            assert lr == pytest.approx(expected(s) * scale, rel=1e-12, abs=1e-15), s
    head_lrs = [max(lr for lr, _ in g) for g in seen]
    assert head_lrs[:warmup] == pytest.approx([base / 4, base / 2, 3 * base / 4, base])
    assert all(a > b for a, b in zip(head_lrs[warmup:], head_lrs[warmup + 1:]))  # strictly decaying
    assert head_lrs[-1] == pytest.approx(0.0, abs=1e-15)
    assert [e.lr for e in epochs] == pytest.approx([head_lrs[steps - 1], head_lrs[2 * steps - 1], head_lrs[-1]])


def test_zero_lr_keeps_weights_reports_smoothed_loss_and_breaks_ties_early():
    clf = classifier()
    with torch.no_grad():  # a head far from uniform logits, so that smoothing changes the loss
        clf.head.weight.normal_(0.0, 1.0)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    cfg = FinetuneConfig(epochs=2, lr=0.0, label_smoothing=0.1)
    result = finetune(clf, train_fn, lambda: batches(*VAL, 48), None, cfg, "cpu", STEPS)
    assert all(torch.equal(clf.state_dict()[k], v) for k, v in before.items())
    assert result.best_epoch == 0 and result.history[0].val_top1 == result.history[1].val_top1
    clf.train()
    with torch.no_grad():
        ref = sum(float(F.cross_entropy(clf(x), y, label_smoothing=0.1)) for x, y in train_fn(0)) / STEPS
        plain = sum(float(F.cross_entropy(clf(x), y)) for x, y in train_fn(0)) / STEPS
    assert result.history[0].train_loss == pytest.approx(ref, rel=1e-5)
    assert abs(ref - plain) > 1e-3  # label smoothing is visible at this loss


def test_nan_batch_raises_naming_the_epoch_and_step():
    def train(epoch):
        out = train_fn(epoch)
        if epoch == 1:
            out[2][0][0, 0, 0, 0] = float("nan")
        return out

    tested = []
    with pytest.raises(ValueError, match=r"epoch 1, step 2"):
        finetune(classifier(), train, lambda: batches(*VAL, 48), lambda: tested.append(1) or [],
                 FinetuneConfig(epochs=3), "cpu", STEPS)
    assert not tested


@pytest.mark.parametrize("n", [STEPS - 1, STEPS + 1])
def test_epoch_length_must_match_steps_per_epoch(n):
    epoch = (train_fn(0) * 2)[:n]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        finetune(classifier(), lambda e: epoch, lambda: batches(*VAL, 48), None, FinetuneConfig(epochs=1), "cpu",
                 STEPS)

"""Periodic evaluation: C with precise BatchNorm statistics, the mask metrics, the exported head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlo_mae.engine import MLOEngine
from mlo_mae.evaluation import evaluate, precise_head
from mlo_mae.export import load_encoder, save_encoder
from mlo_mae.mask_metrics import mean_masked_prob, mean_pairwise_jaccard, random_jaccard, saturated_fraction

from conftest import level_streams


def normalize(images, labels):
    return (images.float() - 128.0) / 64.0, labels


def sample(n=40, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8),
            torch.randint(0, 3, (n,), generator=gen))


def trained_engine(tiny_cfg, steps=3, baseline=False):
    tiny_cfg.mlo.baseline = baseline
    engine = MLOEngine(tiny_cfg, 3, total_steps=10)
    streams = level_streams()
    for _ in range(steps):
        engine.step(streams)
    return engine


def cls_features(engine, images):
    engine.mae.eval()
    with torch.no_grad():
        out = engine.mae.forward_features(normalize(images, None)[0])[:, 0]
    engine.mae.train()
    return out


def test_precise_statistics_are_the_batch_statistics_of_the_current_encoder(tiny_cfg):
    engine = trained_engine(tiny_cfg)
    train_images, _ = sample(seed=1)
    stale = {k: v.clone() for k, v in engine.head.state_dict().items()}
    head = precise_head(engine, train_images, normalize, batch_size=16)  # several batches, one statistic
    # Reference: one BatchNorm update with momentum 1 over the whole sample's CLS features.
    reference = torch.nn.BatchNorm1d(tiny_cfg.model.embed_dim, momentum=1.0, affine=False)
    reference.train()(cls_features(engine, train_images))
    assert torch.allclose(head.norm.running_mean, reference.running_mean, atol=1e-6)
    assert torch.allclose(head.norm.running_var, reference.running_var, rtol=1e-5)
    assert not torch.allclose(head.norm.running_var, stale["norm.running_var"], rtol=1e-2)  # they were stale
    assert not head.training
    # The engine's own head is left as it was (evaluation changes nothing of the run).
    assert all(torch.equal(v, engine.head.state_dict()[k]) for k, v in stale.items())


def test_evaluation_scores_the_precise_head_and_measures_the_masks(tiny_cfg):
    engine = trained_engine(tiny_cfg)
    images, labels = sample()
    train_images, _ = sample(seed=1)
    before = {k: v.clone() for k, v in engine.state_dict()["modules"]["head"].items()}
    rng = torch.get_rng_state()
    ev = evaluate(engine, images, labels, normalize, train_images, batch_size=16)
    head = precise_head(engine, train_images, normalize)
    with torch.no_grad():
        logits = head(engine.mae.eval().forward_features(normalize(images, labels)[0]))
    engine.mae.train()
    assert ev.val_top1 == int((logits.argmax(-1) == labels).sum()) / len(labels)
    assert abs(ev.val_loss - float(F.cross_entropy(logits, labels))) < 1e-5
    snap = ev.snapshot
    assert ev.jaccard == mean_pairwise_jaccard(snap.masks)
    assert ev.saturated == saturated_fraction(snap.probs)
    assert ev.mean_prob_masked == mean_masked_prob(snap.probs, snap.masks)
    assert ev.random_jaccard == random_jaccard(16, 12)  # the tiny model: 16 patches, 12 masked at ratio 0.75
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, engine.head.state_dict()[k]) for k, v in before.items())
    metrics = ev.metrics()
    assert metrics["eval/val_top1"] == ev.val_top1 and metrics["mask/jaccard"] == ev.jaccard


def test_baseline_evaluation_has_random_masks_and_no_probability_metrics(tiny_cfg):
    engine = trained_engine(tiny_cfg, baseline=True)
    images, labels = sample(n=200)
    ev = evaluate(engine, images, labels, normalize, sample(seed=1)[0])
    assert ev.saturated is None and ev.mean_prob_masked is None
    assert abs(ev.jaccard - ev.random_jaccard) < 0.02  # uniformly random masks


def test_exported_head_is_the_precise_head_as_a_timm_classifier(tiny_cfg, tmp_path):
    engine = trained_engine(tiny_cfg)
    images, labels = sample()
    head = precise_head(engine, sample(seed=1)[0], normalize)
    save_encoder(engine.mae, tiny_cfg.model, tmp_path, head=head)
    model = load_encoder(tmp_path, with_head=True).eval()
    x = normalize(images, labels)[0]
    with torch.no_grad():
        expected = head(engine.mae.eval().forward_features(x))
        got = model(x)
    assert got.shape == (len(images), 3)
    assert torch.allclose(got, expected, atol=1e-5)
    features_only = load_encoder(tmp_path)  # the encoder file alone still loads strictly, as before
    assert features_only.num_classes == 0


def blocks(n=8, seed=0):
    """Hand-made 8x8 images (16 patches of 2x2): four textured patches (a checkerboard) on a flat
    background, at random places: the object is known."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.full((n, 3, 8, 8), 40, dtype=torch.uint8)
    objects = torch.zeros(n, 16)
    for i in range(n):
        for patch in torch.randperm(16, generator=gen)[:8].tolist():  # half of them: the object
            r, c = divmod(patch, 4)
            images[i, :, 2 * r: 2 * r + 2, 2 * c: 2 * c + 2] = torch.tensor([[0, 255], [255, 0]], dtype=torch.uint8)
            objects[i, patch] = 1
    return images, torch.zeros(n, dtype=torch.long), objects


@pytest.mark.parametrize("rule,expected", [("object-first", 1.0), ("background-first", 0.5), ("random", None)])
def test_object_masked_share_and_error_ratio_on_hand_made_images(tiny_cfg, rule, expected):
    tiny_cfg.mlo.baseline, tiny_cfg.mlo.baseline_rule = True, rule
    engine = MLOEngine(tiny_cfg, 3, total_steps=10)
    images, labels, objects = blocks(n=64)
    ev = evaluate(engine, images, labels, normalize, images)
    assert ev.object_masked_random == 12 / 16
    if expected is None:  # random masks: about k/N of the object masked, the same error as random masks
        assert ev.object_masked == pytest.approx(12 / 16, abs=0.05)
        assert ev.recon_vs_random == pytest.approx(1.0, abs=0.1)
    else:  # k = 12 of 16 with 8 object patches: all of them, or the 4 left after the 8 flat ones
        assert ev.object_masked == expected
        masked = ev.snapshot.masks
        assert torch.equal((masked * objects).sum(1), torch.full((64,), 8.0 if rule == "object-first" else 4.0))
    assert ev.metrics()["mask/object_masked"] == ev.object_masked
    assert ev.recon_vs_random > 0


def test_error_ratio_is_the_stage_one_weighted_error_over_random_masks(tiny_cfg):
    from mlo_mae.mask_metrics import weighted_error
    from mlo_mae.masking import random_mask, stage1_weights

    engine = trained_engine(tiny_cfg)
    images, labels = sample(n=16)
    ev = evaluate(engine, images, labels, normalize, images, batch_size=16)
    x = normalize(images, labels)[0]
    gen = torch.Generator().manual_seed(tiny_cfg.run.seed)  # the evaluation's draws for its first batch
    engine.mae.eval()
    with torch.no_grad():
        probs, mask = engine.choose_mask(x, gen)
        reference = random_mask(16, 16, 0.75, x.device, gen)
        run = weighted_error(engine.mae(x, mask.ids_keep, mask.ids_restore), stage1_weights(mask.mask, probs))
        rand = weighted_error(engine.mae(x, reference.ids_keep, reference.ids_restore), reference.mask)
    engine.mae.train()
    assert ev.recon_vs_random == pytest.approx(run / rand, rel=1e-6)
